"""Every refusal of the batcher: the same exception type and message on the C++ path and the Python fallback,
naming the argument, what was expected and what was received. Direct calls into rlhf_fast._C raise too."""
import numpy as np
import pytest
import torch

from rlhf_fast.batching import balanced_partition, pack, pad, plan_micro_batches, unpack, unpad
from rlhf_fast.batching._backend import native_batcher

from test_batching_oracles import needs_cpp

SEQS = [[1, 2, 3], [4, 5]]

CASES = [
    # (call, expected exception, words the message must contain)
    (lambda b: balanced_partition([3, -1], 2, backend=b), ValueError, ["lengths", ">= 0", "-1", "index 1"]),
    (lambda b: balanced_partition([1.0, 2.0], 2, backend=b), TypeError, ["lengths", "integers", "float64"]),
    (lambda b: balanced_partition([True, False], 2, backend=b), TypeError, ["lengths", "bool"]),
    (lambda b: balanced_partition([[1, 2]], 2, backend=b), ValueError, ["lengths", "1-D", "(1, 2)"]),
    (lambda b: balanced_partition(["a"], 1, backend=b), TypeError, ["lengths", "integers", "<U1"]),
    (lambda b: balanced_partition([1, 2], 0, backend=b), ValueError, ["k", ">= 1", "got 0"]),
    (lambda b: balanced_partition([1, 2], -3, backend=b), ValueError, ["k", ">= 1", "-3"]),
    (lambda b: balanced_partition([1, 2], 1.5, backend=b), TypeError, ["k", "integer", "1.5"]),
    (lambda b: balanced_partition([1, 2], True, backend=b), TypeError, ["k", "integer", "True"]),
    (lambda b: balanced_partition([1, 2, 3], 2, equal_size=True, backend=b), ValueError,
     ["lengths", "divisible by k=2", "3 sequences"]),
    (lambda b: balanced_partition([1, 2], 2, workload="flops", backend=b), ValueError, ["workload", "'flops'"]),
    (lambda b: balanced_partition([1, 2], 2, workload=(1, 2, 3), backend=b), ValueError, ["workload", "(a, b)"]),
    (lambda b: balanced_partition([1, 2], 2, workload=(-1, 1), backend=b), ValueError, ["workload", ">= 0"]),
    (lambda b: balanced_partition([1, 2], 2, workload=("a", 1), backend=b), TypeError, ["workload", "real"]),
    (lambda b: balanced_partition([2**40, 2**40], 2, workload="attention", backend=b), ValueError,
     ["workload", "overflow"]),
    (lambda b: plan_micro_batches([3, 0, 2], 8, backend=b), ValueError, ["lengths", ">= 1", "index 1"]),
    (lambda b: plan_micro_batches([3, 9, 2], 8, backend=b), ValueError,
     ["lengths", "max_tokens=8", "sequence 1", "9 tokens"]),
    (lambda b: plan_micro_batches([3], 0, backend=b), ValueError, ["max_tokens", ">= 1", "got 0"]),
    (lambda b: plan_micro_batches([3], 8.0, backend=b), TypeError, ["max_tokens", "integer", "8.0"]),
    (lambda b: plan_micro_batches([3], 8, num_ranks=0, backend=b), ValueError, ["num_ranks", ">= 1"]),
    (lambda b: plan_micro_batches([3], 8, min_micro_batches=0, backend=b), ValueError, ["min_micro_batches"]),
    (lambda b: plan_micro_batches([3, 3, 3], 8, num_ranks=2, equal_size=True, backend=b), ValueError,
     ["divisible by num_ranks=2", "3 sequences"]),
    (lambda b: plan_micro_batches(torch.tensor([1.5]), 8, backend=b), TypeError, ["lengths", "float32"]),
    (lambda b: pack([[1, 2], []], backend=b), ValueError, ["sequences[1]", "at least 1 token"]),
    (lambda b: pack([[1.5, 2.0]], backend=b), TypeError, ["sequences[0]", "integer token ids", "float64"]),
    (lambda b: pack([np.ones((2, 2), dtype=np.int64)], backend=b), ValueError, ["sequences[0]", "1-D", "(2, 2)"]),
    (lambda b: pack([7], backend=b), TypeError, ["sequences[0]", "int"]),
    (lambda b: pack("abc", backend=b), TypeError, ["sequences", "str"]),
    (lambda b: pack(SEQS, fields={"lp": [[0.1, 0.2, 0.3], [0.4]]}, backend=b), ValueError,
     ["fields['lp'][1]", "(2,)", "(1,)"]),
    (lambda b: pack(SEQS, fields={"lp": [[0.1, 0.2, 0.3]]}, backend=b), ValueError,
     ["fields['lp']", "one array per sequence (2)", "got 1"]),
    (lambda b: pack(SEQS, fields={"lp": [["a", "b", "c"], ["d", "e"]]}, backend=b), TypeError,
     ["fields['lp'][0]", "numeric or bool"]),
    (lambda b: pack(SEQS, fields={"lp": [np.ones(3, np.complex64), np.ones(2, np.complex64)]}, backend=b),
     TypeError, ["fields['lp'][0]", "real", "complex64"]),
    (lambda b: pack(SEQS, fields={"input_ids": SEQS}, backend=b), ValueError, ["fields", "'input_ids'"]),
    (lambda b: pack(SEQS, fields=[1], backend=b), TypeError, ["fields", "dict", "list"]),
    (lambda b: pack(SEQS, indices=[0, 2], backend=b), ValueError, ["indices", "[0, 1]", "got 2"]),
    (lambda b: pack(SEQS, indices=[1, 1], backend=b), ValueError, ["indices", "distinct", "[1, 1]"]),
    (lambda b: pack(SEQS, indices=[0.0], backend=b), TypeError, ["indices", "integers", "float64"]),
    (lambda b: pad(SEQS, padding_side="top", backend=b), ValueError, ["padding_side", "'top'"]),
    (lambda b: pad(SEQS, pad_value=0.5, backend=b), TypeError, ["pad_value", "integer", "0.5"]),
    (lambda b: pad(SEQS, pad_value=2**70, backend=b), ValueError, ["pad_value", "int64"]),
    (lambda b: pad(SEQS, pad_value="x", backend=b), TypeError, ["pad_value", "real number", "'x'"]),
    (lambda b: pad(SEQS, field_pad_values={"lp": 0}, backend=b), ValueError, ["field_pad_values", "['lp']"]),
    (lambda b: pad(SEQS, pad_to_multiple_of=0, backend=b), ValueError, ["pad_to_multiple_of", ">= 1"]),
    (lambda b: pad(SEQS, fields={"m": [[1, 1, 0], [1, 0]]}, field_pad_values={"m": 0.5}, backend=b), TypeError,
     ["field_pad_values['m']", "integer", "0.5"]),
    (lambda b: balanced_partition([1], 1, backend="gpu"), ValueError, ["backend", "'gpu'"]),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_error_is_raised_with_a_clear_message(case):
    call, error, words = CASES[case]
    messages = []
    for backend in ["python"] + (["cpp"] if native_batcher() is not None else []):
        with pytest.raises(error) as info:
            call(backend)
        message = str(info.value)
        for word in words:
            assert word in message, (word, message)
        messages.append(message)
    assert len(set(messages)) == 1  # identical on both paths


def test_unpack_and_unpad_check_shapes():
    packed = pack(SEQS)
    with pytest.raises(ValueError, match=r"values: expected shape \[1, 5, \*\] or \[5, \*\].*\(1, 4\)"):
        unpack(np.zeros((1, 4)), packed)
    padded = pad(SEQS)
    with pytest.raises(ValueError, match=r"values: expected shape \[2, 3, \*\].*\(3, 2\)"):
        unpad(torch.zeros(3, 2), padded)


@needs_cpp
def test_native_functions_refuse_bad_input_directly():
    c = native_batcher()
    with pytest.raises(ValueError, match="k: expected"):
        c.batcher_partition(np.array([1, 2], dtype=np.int64), 0, False)
    with pytest.raises(ValueError, match="divisible"):
        c.batcher_partition(np.array([1, 2, 3], dtype=np.int64), 2, True)
    with pytest.raises(ValueError, match="finite values >= 0"):
        c.batcher_partition(np.array([1.0, np.nan]), 2, False)
    with pytest.raises(TypeError, match="int64 or float64"):
        c.batcher_partition(np.array([1, 2], dtype=np.int32), 2, False)
    with pytest.raises(ValueError, match="1-D"):
        c.batcher_partition(np.ones((2, 2), dtype=np.int64), 2, False)
    with pytest.raises(ValueError, match="max_tokens=4"):
        c.batcher_plan(np.array([5], dtype=np.int64), np.array([5], dtype=np.int64), 4, 1, False, 1)
    with pytest.raises(ValueError, match="one weight per length"):
        c.batcher_plan(np.array([5], dtype=np.int64), np.array([5, 1], dtype=np.int64), 8, 1, False, 1)
    with pytest.raises(TypeError, match="expected dtype int64"):
        c.batcher_concat([np.ones(2, np.int32)], np.dtype(np.int64))
    with pytest.raises(ValueError, match="contiguous"):
        c.batcher_concat([np.ones(4, np.int64)[::2]], np.dtype(np.int64))
    with pytest.raises(ValueError, match="at most width=1"):
        c.batcher_pad_rows([np.ones(2, np.int64)], np.dtype(np.int64), 1, np.array(0), False)
    with pytest.raises(ValueError, match="seq_lens"):
        c.batcher_padded_layout(np.array([3], dtype=np.int64), 2, False)
