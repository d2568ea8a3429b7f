"""Every refusal of the batcher: the same exception type and message on the C++ path and the Python fallback,
naming the argument, what was expected and what was received. Direct calls into rlhf_fast._C raise too."""
import subprocess
import sys

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
    # Sizes past int64 (or past what the C++ state can index): one ValueError naming the argument on both paths,
    # not pybind's "incompatible function arguments" TypeError on one and an OverflowError on the other.
    (lambda b: balanced_partition([1, 2], 2**63, backend=b), ValueError, ["k", "<= 2147483647", str(2**63)]),
    (lambda b: balanced_partition([1, 2], 2**40, backend=b), ValueError, ["k", "<= 2147483647", str(2**40)]),
    (lambda b: plan_micro_batches([3], 8, num_ranks=2**63, backend=b), ValueError,
     ["num_ranks", "<= 2147483647"]),
    (lambda b: plan_micro_batches([3], 8, min_micro_batches=2**64, backend=b), ValueError,
     ["min_micro_batches", "<= 2147483647"]),
    (lambda b: balanced_partition([2**63], 1, backend=b), ValueError,  # uint64: no wrap to a negative length
     ["lengths", "sum fits in int64", str(2**63)]),
    (lambda b: balanced_partition([1, 2**70], 2, backend=b), ValueError,  # object dtype of Python ints
     ["lengths", "sum fits in int64", str(2**70)]),
    (lambda b: plan_micro_batches(np.array([2**62, 2**62], dtype=np.uint64), 2**63, backend=b), ValueError,
     ["lengths", "sum fits in int64"]),
    (lambda b: balanced_partition([0, 0], 2, workload=(2**70, 0), backend=b), ValueError,
     ["workload", "overflow int64"]),
    (lambda b: balanced_partition([10, 20], 2, workload=(0.0, 1e300), backend=b), ValueError,
     ["workload", "overflow float64"]),
    (lambda b: balanced_partition([10, 20], 2, workload=(1e308, 0.0), backend=b), ValueError,
     ["workload", "overflow float64"]),
    (lambda b: pad(SEQS, pad_to_multiple_of=2**63, backend=b), ValueError, ["pad_to_multiple_of", "<= 2147483647"]),
    # Only plain-data dtypes reach the copies (object arrays hold pointers; timedelta64 is no number to pack).
    (lambda b: pack(SEQS, fields={"o": [np.array([1, 2, 3], dtype=object), np.array([4, 5], dtype=object)]},
                    backend=b), TypeError, ["fields['o'][0]", "numeric or bool", "object"]),
    (lambda b: pad(SEQS, fields={"t": [np.ones(3, "m8[s]"), np.ones(2, "m8[s]")]}, backend=b), TypeError,
     ["fields['t'][0]", "numeric or bool", "timedelta64"]),
    (lambda b: pack([np.ones(3, "m8[s]")], backend=b), TypeError, ["sequences[0]", "integer token ids"]),
    # uint64 ids past int64 (or Python ints that NumPy stores as uint64): refused, not wrapped to negative ids.
    (lambda b: pack([[1, 2], np.array([5, 2**63, 7], dtype=np.uint64)], backend=b), ValueError,
     ["sequences[1]", "fit in int64", str(2**63), "position 1"]),
    (lambda b: pad([[2**64 - 1]], backend=b), ValueError, ["sequences[0]", "fit in int64", str(2**64 - 1)]),
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


# ------------------------------------------------------------------ int64 overflow and raw-copy dtypes (P0 fixes)


@pytest.mark.parametrize("max_tokens", [2**63 - 100, 2**63 - 1, 2**63, 2**64, 10**30])
def test_max_tokens_past_int64_plans_like_no_cap(max_tokens):
    # 2**63 - 100 crashed the C++ path (ceil division overflowed to 0 micro-batches, then KK with k=0 wrote out
    # of bounds); 2**63 and up raised pybind's TypeError there while Python planned them.
    plans = {}
    for backend in ["python"] + (["cpp"] if native_batcher() is not None else []):
        plan = plan_micro_batches([100, 200], max_tokens, backend=backend)
        assert plan.micro_batches == [[[0, 1]]]
        assert plan.max_tokens == max_tokens
        assert plan.token_counts.tolist() == [[300]]
        plans[backend] = plan.micro_batches
        uneven = plan_micro_batches([5, 1, 7, 3, 2], max_tokens, num_ranks=2, min_micro_batches=3, backend=backend)
        plans[backend + "-uneven"] = uneven.micro_batches
        # A cap at or above the total plans exactly like the total: the clamp changes nothing.
        assert uneven.micro_batches == plan_micro_batches([5, 1, 7, 3, 2], 18, num_ranks=2, min_micro_batches=3,
                                                          backend=backend).micro_batches
    if "cpp" in plans:
        assert plans["cpp"] == plans["python"] and plans["cpp-uneven"] == plans["python-uneven"]


@needs_cpp
def test_the_reported_crash_exits_cleanly_in_a_fresh_process():
    code = ("from rlhf_fast.batching import plan_micro_batches as p; "
            "assert p([100, 200], 2**63 - 100).micro_batches == [[[0, 1]]]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])


@needs_cpp
def test_native_plan_and_partition_refuse_overflowing_sizes_directly():
    c = native_batcher()
    i64 = lambda *v: np.array(v, dtype=np.int64)  # noqa: E731
    # A cap near 2**63 straight into C++: overflow-free ceil division, one micro-batch.
    order, offsets, count = c.batcher_plan(i64(100, 200), i64(100, 200), 2**63 - 100, 1, False, 1)
    assert (order.tolist(), offsets.tolist(), count) == ([0, 1], [0, 2], 1)
    order, offsets, count = c.batcher_plan(i64(2**62 - 1, 1), i64(2, 1), 2**63 - 1, 1, False, 1)
    assert count == 1 and order.tolist() == [0, 1]
    with pytest.raises(ValueError, match="lengths: expected values whose sum is at most 2\\*\\*62"):
        c.batcher_plan(i64(2**62, 2**62), i64(1, 1), 2**63 - 1, 1, False, 1)
    with pytest.raises(ValueError, match="weights: expected values whose sum is at most 2\\*\\*62"):
        c.batcher_partition(i64(2**62, 2**62, 2**62, 2**62), 2, False)
    with pytest.raises(ValueError, match="weights: expected values whose sum is below 2\\*\\*1010"):
        c.batcher_partition(np.array([1e308, 1e308]), 2, False)
    # k * slots past int64 wrapped the state size to 0 (an out-of-bounds write) before k was bounded.
    with pytest.raises(ValueError, match="k: expected an integer <= 2147483647"):
        c.batcher_partition(i64(1, 2, 3, 4), 2**62, False)
    with pytest.raises(ValueError, match="num_ranks: expected an integer >= 1"):
        c.batcher_plan(i64(1, 2), i64(1, 2), 8, 0, False, 1)
    with pytest.raises(ValueError, match="min_micro_batches: expected an integer <= 2147483647"):
        c.batcher_plan(i64(1, 2), i64(1, 2), 8, 1, False, 2**40)
    with pytest.raises(ValueError, match="seq_lens: expected values whose sum is at most 2\\*\\*62"):
        c.batcher_packed_positions(i64(2**61, 2**61, 2**61))


@needs_cpp
def test_native_copies_refuse_object_and_other_non_plain_dtypes():
    c = native_batcher()
    # The reported use-after-free: object pointers were memcpy'd without references.
    source = [np.array([object(), "x", 3], dtype=object)]
    with pytest.raises(TypeError, match="dtype: expected a bool, integer, float or complex dtype.*object"):
        c.batcher_concat(source, np.dtype(object))
    with pytest.raises(TypeError, match="dtype: expected .*object"):
        c.batcher_pad_rows(source, np.dtype(object), 4, np.array(None, dtype=object), False)
    # Object arrays cannot sneak in under a plain target dtype either.
    with pytest.raises(TypeError, match="arrays\\[0\\]: expected dtype int64, got object"):
        c.batcher_concat([np.array([1, 2], dtype=object)], np.dtype(np.int64))
    for dtype in [np.dtype("U3"), np.dtype("S3"), np.dtype("M8[s]"), np.dtype("m8[s]"), np.dtype(">i8"),
                  np.dtype([("a", np.int64), ("b", object)]), np.dtype([("a", np.int32)])]:
        with pytest.raises(TypeError, match="dtype: expected a bool, integer, float or complex dtype"):
            c.batcher_concat([np.zeros(2, dtype=dtype)], dtype)
        with pytest.raises(TypeError, match="dtype: expected a bool, integer, float or complex dtype"):
            c.batcher_pad_rows([np.zeros(2, dtype=dtype)], dtype, 3, np.zeros((), dtype=dtype), False)
    # A byte-swapped source is not the native dtype it claims to be (the copy would scramble the values).
    with pytest.raises(TypeError, match="arrays\\[0\\]: expected dtype int64"):
        c.batcher_concat([np.arange(3, dtype=">i8")], np.dtype(np.int64))
    with pytest.raises(ValueError, match="width: expected an integer >= 0"):
        c.batcher_pad_rows([], np.dtype(np.int64), -1, np.array(0), False)
    # Plain dtypes still copy exactly.
    for dtype in [np.bool_, np.int8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64,
                  np.complex64, np.longdouble]:
        arrays = [np.arange(3).astype(dtype), np.arange(2).astype(dtype)]
        np.testing.assert_array_equal(c.batcher_concat(arrays, np.dtype(dtype)), np.concatenate(arrays))
        padded = c.batcher_pad_rows(arrays, np.dtype(dtype), 3, np.array(1, dtype=dtype), True)
        np.testing.assert_array_equal(padded, np.array([[0, 1, 2], [1, 0, 1]]).astype(dtype))


@pytest.mark.parametrize("backend", ["python"] + (["cpp"] if native_batcher() is not None else []))
def test_object_arrays_of_small_ints_are_lengths(backend):
    lengths = np.array([3, 1, 2, 5], dtype=object)
    assert balanced_partition(lengths, 2, backend=backend) == balanced_partition([3, 1, 2, 5], 2, backend=backend)
    assert plan_micro_batches(lengths, 6, backend=backend) == plan_micro_batches([3, 1, 2, 5], 6, backend=backend)
