"""pack / pad / unpack / unpad / restore_order: exact round trips, flash-attn layout, C++ == Python."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlhf_fast.batching import pack, pad, plan_micro_batches, restore_order, unpack, unpad

from test_batching_oracles import BACKENDS, needs_cpp

FAST = settings(max_examples=40, deadline=None)


@st.composite
def rollouts(draw):
    lengths = draw(st.lists(st.integers(1, 12), min_size=0, max_size=10))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    ids = [rng.integers(0, 50_000, size=n) for n in lengths]
    fields = {
        "logprobs": [rng.standard_normal(n).astype(np.float32) for n in lengths],
        "mask": [rng.random(n) < 0.5 for n in lengths],
        "rewards": [rng.standard_normal(n).astype(np.float16) for n in lengths],
    }
    order = draw(st.permutations(range(len(lengths))))
    subset = order[: draw(st.integers(0, len(lengths)))]
    return ids, fields, list(subset)


def assert_same_arrays(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and np.array_equal(g, e)


@FAST
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=rollouts())
def test_pack_round_trip(case, backend):
    ids, fields, subset = case
    batch = pack(ids, indices=subset, fields=fields, backend=backend)
    lengths = [len(ids[i]) for i in subset]
    assert batch.input_ids.shape == (1, sum(lengths)) and batch.input_ids.dtype == np.int64
    assert batch.cu_seqlens.dtype == np.int32 and batch.cu_seqlens.tolist() == np.cumsum([0] + lengths).tolist()
    assert batch.max_seqlen == max(lengths, default=0)
    assert batch.position_ids.tolist() == [[t for n in lengths for t in range(n)]]
    assert batch.indices.tolist() == subset
    assert_same_arrays(unpack(batch.input_ids, batch), [ids[i] for i in subset])
    for name, values in fields.items():
        assert_same_arrays(unpack(batch.fields[name], batch), [values[i] for i in subset])
    hidden = np.arange(sum(lengths) * 3, dtype=np.float32).reshape(1, -1, 3)
    pieces = unpack(hidden, batch)
    assert [p.shape for p in pieces] == [(n, 3) for n in lengths]
    assert np.array_equal(np.concatenate(pieces or [np.zeros((0, 3), np.float32)]), hidden[0])


@FAST
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=rollouts(), side=st.sampled_from(["left", "right"]), multiple=st.sampled_from([None, 1, 8]))
def test_pad_round_trip(case, side, multiple, backend):
    ids, fields, subset = case
    batch = pad(ids, indices=subset, fields=fields, padding_side=side, pad_value=-7, pad_to_multiple_of=multiple,
                field_pad_values={"logprobs": -1.5}, backend=backend)
    lengths = [len(ids[i]) for i in subset]
    width = max(lengths, default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    assert batch.input_ids.shape == (len(subset), width)
    assert batch.attention_mask.sum(axis=1).tolist() == lengths
    assert (batch.input_ids[batch.attention_mask == 0] == -7).all()
    assert (batch.fields["logprobs"][batch.attention_mask == 0] == -1.5).all()
    assert (batch.fields["mask"][batch.attention_mask == 0] == False).all()  # noqa: E712
    for row, n in enumerate(lengths):
        valid = batch.attention_mask[row].astype(bool)
        assert batch.position_ids[row][valid].tolist() == list(range(n))
        assert valid[:n].all() if side == "right" else valid[width - n:].all()
    assert_same_arrays(unpad(batch.input_ids, batch), [ids[i] for i in subset])
    for name, values in fields.items():
        assert_same_arrays(unpad(batch.fields[name], batch), [values[i] for i in subset])


@needs_cpp
@FAST
@given(rollouts(), st.sampled_from(["left", "right"]))
def test_cpp_equals_python(case, side):
    ids, fields, subset = case
    packed = [pack(ids, indices=subset, fields=fields, backend=b) for b in ("cpp", "python")]
    padded = [pad(ids, indices=subset, fields=fields, padding_side=side, pad_value=3, backend=b)
              for b in ("cpp", "python")]
    for a, b in (packed, padded):
        for name in ("input_ids", "position_ids", "seq_lens", "indices"):
            assert getattr(a, name).dtype == getattr(b, name).dtype
            assert np.array_equal(getattr(a, name), getattr(b, name))
        for name in a.fields:
            assert a.fields[name].dtype == b.fields[name].dtype and np.array_equal(a.fields[name], b.fields[name])
    assert np.array_equal(packed[0].cu_seqlens, packed[1].cu_seqlens)
    assert np.array_equal(padded[0].attention_mask, padded[1].attention_mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_pack_restore_round_trip(backend):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=57).tolist()
    ids = [torch.randint(0, 1000, (n,)) for n in lengths]  # torch inputs are accepted
    logprobs = [torch.randn(n, dtype=torch.bfloat16) for n in lengths]  # widened to float32, exactly
    plan = plan_micro_batches(lengths, 1024, num_ranks=3, backend=backend)
    batches, outputs = [], []
    for rank in plan:
        for mb in rank:
            batch = pack(ids, indices=mb, fields={"logprobs": logprobs}, backend=backend)
            assert batch.input_ids.shape[1] <= 1024
            per_token = torch.from_numpy(batch.fields["logprobs"]) * 2  # a model output as a torch tensor
            batches.append(batch)
            outputs.append(unpack(per_token, batch))
    restored = restore_order(outputs, batches)
    for seq, lp in zip(restored, logprobs):
        assert torch.equal(seq, lp.float() * 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_torch_views(backend):
    empty = pack([[1, 2]], indices=[], backend=backend)
    assert empty.input_ids.shape == (1, 0) and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0
    assert unpack(np.zeros((1, 0)), empty) == []
    assert pad([[1, 2]], indices=[], backend=backend).input_ids.shape == (0, 0)
    batch = pack([[5, 6, 7], np.array([8], dtype=np.int32)], backend=backend)
    tensors = batch.to_torch()
    assert tensors["input_ids"].data_ptr() == batch.input_ids.ctypes.data  # no copy
    assert tensors["cu_seq_lens_q"].dtype == torch.int32 and tensors["max_length_q"] == 3
    padded = pad([[5, 6, 7], [8]], padding_side="left", backend=backend)
    assert padded.to_torch()["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert restore_order([unpad(padded.input_ids, padded)], [padded])[1].tolist() == [8]
    assert restore_order([], []) == []
