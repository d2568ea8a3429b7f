"""Every public op refuses bad input with an error naming the argument, the expectation and what came."""
import pytest
import torch

from rlhf_fast import ops


def logits_inputs(rows=2, steps=3, vocab=5):
    return dict(
        logits=torch.randn(rows, steps, vocab),
        labels=torch.randint(0, vocab, (rows, steps)),
        old_logp=torch.randn(rows, steps),
        advantages=torch.randn(rows, steps),
        mask=torch.ones(rows, steps),
    )


def call_fused(**changes):
    kw = logits_inputs()
    kw.update(changes)
    args = [kw.pop(k) for k in ("logits", "labels", "old_logp", "advantages", "mask")]
    return ops.fused_ppo_loss(*args, **kw)


@pytest.mark.parametrize(
    "call,error,pattern",
    [
        (lambda: ops.selective_log_softmax([1.0], torch.zeros(1)), TypeError, r"logits: expected a torch.Tensor, got list"),
        (lambda: ops.selective_log_softmax(torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.long)), TypeError, r"logits: expected dtype in .*got torch.int32"),
        (lambda: ops.selective_log_softmax(torch.zeros(4), torch.zeros((), dtype=torch.long)), ValueError, r"logits: expected a tensor \[\*, V\].*got shape \(4,\)"),
        (lambda: ops.selective_log_softmax(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long)), ValueError, r"labels: expected shape \(3,\).*got \(2,\)"),
        (lambda: ops.selective_log_softmax(torch.zeros(3, 4), torch.zeros(3)), TypeError, r"labels: expected dtype in \(int64, int32\), got torch.float32"),
        (lambda: ops.selective_log_softmax(torch.zeros(3, 4), torch.tensor([0, 4, 1])), ValueError, r"labels: expected values in \[0, 3\].*got 4"),
        (lambda: ops.selective_log_softmax(torch.zeros(3, 4), torch.tensor([0, -1, 1])), ValueError, r"labels: .*got -1"),
        (lambda: ops.selective_log_softmax(torch.zeros(3, 4), torch.zeros(3, dtype=torch.long), temperature=0), ValueError, r"temperature: expected a value > 0.0, got 0.0"),
        (lambda: ops.logprobs_and_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long)), ValueError, r"logits: expected a non-empty vocabulary"),
        (lambda: ops.token_kl(torch.zeros(3), torch.zeros(4)), ValueError, r"ref_logp: expected shape \(3,\)"),
        (lambda: ops.token_kl(torch.zeros(3), torch.zeros(3), estimator="k4"), ValueError, r"estimator: expected one of \['k1', 'k2', 'k3'\], got 'k4'"),
        (lambda: ops.gae(torch.zeros(3), torch.zeros(3), torch.ones(3)), ValueError, r"rewards: expected a 2-d tensor \[B, T\], got shape \(3,\)"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), ValueError, r"values: expected shape \(2, 3\)"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5), ValueError, r"gamma: expected a value <= 1.0, got 1.5"),
        (lambda: ops.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), lam="x"), TypeError, r"lam: expected a real number, got str"),
        (lambda: ops.masked_whiten(torch.zeros(2, 3), torch.ones(3, 2)), ValueError, r"mask: expected shape \(2, 3\)"),
        (lambda: ops.masked_whiten(torch.zeros(2, 3), torch.ones(2, 3), shift_mean=1), TypeError, r"shift_mean: expected a bool"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3)), ValueError, r"advantages: expected shape \(2, 3\).*or \(2,\).*got \(3,\)"),
        (lambda: ops.ppo_policy_loss(torch.zeros(6), torch.zeros(6), torch.zeros(2), torch.ones(6)), ValueError, r"advantages: expected shape \(6,\)"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2)), ValueError, r"mask: expected shape \(2, 3\)"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), agg="mean"), ValueError, r"agg: expected one of .*got 'mean'"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), dual_clip=0.5), ValueError, r"dual_clip: expected a value > 1.0, got 0.5"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), clip_low=-0.1), ValueError, r"clip_low: expected a value >= 0.0"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), num_tokens=0), ValueError, r"num_tokens: expected a value > 0"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), num_tokens=1e-46), ValueError, r"num_tokens: expected a value representable in float32 .*got 1e-46"),
        (lambda: ops.ppo_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), agg="seq-mean-token-sum", num_seqs=torch.tensor(1e39, dtype=torch.float64)), ValueError, r"num_seqs: expected a value representable in float32 .*got 1e\+39"),
        (lambda: ops.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), is_weights=torch.ones(3)), ValueError, r"is_weights: expected shape \(2, 3\)"),
        (lambda: ops.ppo_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3)), ValueError, r"returns: expected shape \(2, 3\)"),
        (lambda: ops.ppo_value_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), clip=-1), ValueError, r"clip: expected a value >= 0.0"),
        (lambda: call_fused(kl_coef=0.1), ValueError, r"ref_logp: expected a tensor of shape \(2, 3\) when kl_coef != 0, got None"),
        (lambda: call_fused(kl_estimator="k9", ref_logp=torch.zeros(2, 3)), ValueError, r"kl_estimator: expected one of"),
        (lambda: call_fused(old_logp=torch.zeros(2, 4)), ValueError, r"old_logp: expected shape \(2, 3\) \(the shape of labels\), got \(2, 4\)"),
        (lambda: call_fused(inplace_grad="yes"), TypeError, r"inplace_grad: expected a bool"),
        (lambda: call_fused(logits=torch.zeros(2, 3, 5, dtype=torch.float64)), TypeError, r"logits: expected dtype in \(float32, float16, bfloat16\), got torch.float64"),
        (lambda: ops.linear_logprobs(torch.zeros(4, 3), torch.zeros(5, 2), torch.zeros(4, dtype=torch.long)), ValueError, r"weight: expected shape \[V, 3\]"),
        (lambda: ops.linear_logprobs(torch.zeros(4, 3), torch.zeros(5, 3, dtype=torch.float16), torch.zeros(4, dtype=torch.long)), TypeError, r"weight: expected dtype torch.float32"),
        (lambda: ops.linear_logprobs(torch.zeros(4, 3), torch.zeros(5, 3), torch.zeros(4, dtype=torch.long), bias=torch.zeros(4)), ValueError, r"bias: expected shape \(5,\)"),
        (lambda: ops.linear_logprobs(torch.zeros(4, 3), torch.zeros(5, 3), torch.full((4,), 5)), ValueError, r"labels: expected values in \[0, 4\]"),
        (lambda: ops.fused_linear_ppo_loss(torch.zeros(2, 3, 4), torch.zeros(6, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 2)), ValueError, r"mask: expected shape \(2, 3\)"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_device_mix_is_refused():
    meta = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match=r"expected all tensors on one device, got .*meta"):
        ops.token_kl(torch.zeros(2, 3), meta)


def test_leading_dimensions_are_restored():
    logits, labels = torch.randn(2, 3, 4, 7), torch.randint(0, 7, (2, 3, 4))
    logp, entropy = ops.logprobs_and_entropy(logits, labels)
    assert logp.shape == entropy.shape == (2, 3, 4)
    flat = ops.selective_log_softmax(logits.reshape(-1, 7), labels.reshape(-1))
    assert torch.equal(flat.view(2, 3, 4), logp)


def test_int32_labels_and_int_mask_accepted():
    kw = logits_inputs()
    loss_a, _ = call_fused(labels=kw["labels"].int(), mask=kw["mask"].int())
    assert torch.isfinite(loss_a)


def test_flat_per_token_inputs_are_one_sequence():
    torch.manual_seed(0)
    logp, old, adv = torch.randn(8), torch.randn(8), torch.randn(8)
    mask = torch.rand(8) > 0.3
    flat, _ = ops.ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    rows, _ = ops.ppo_policy_loss(logp[None], old[None], adv[None], mask[None], agg="seq-mean-token-mean")
    torch.testing.assert_close(flat, rows)


def test_label_range_check_is_one_reduction_and_one_copy():
    """The label check is the only device sync of the log-prob ops: one aminmax, one copy to the host, no
    per-bound scalar reads (each ``int(tensor)`` would be a separate sync on CUDA)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rlhf_fast._validation import check_labels

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    for dtype in (torch.int64, torch.int32):
        labels = torch.tensor([[3, 0], [6, 2]], dtype=dtype)
        with Record() as seen:
            check_labels("labels", labels, 7)
        assert seen.ops.count("aminmax") == 1, seen.ops
        assert not {"min", "max", "_local_scalar_dense", "item"} & set(seen.ops), seen.ops
        with pytest.raises(ValueError, match=r"labels: expected values in \[0, 6\].*got 7"):
            check_labels("labels", labels + 1, 7)
        with pytest.raises(ValueError, match=r"labels: .*got -1"):
            check_labels("labels", labels - 1, 7)


def _mask_calls(mask):
    """Every op that takes a mask, called with ``mask`` (shape (2, 3)) and otherwise valid inputs."""
    x = torch.randn(2, 3)
    kw = logits_inputs()
    yield "gae", lambda: ops.gae(x, x, mask)
    yield "masked_whiten", lambda: ops.masked_whiten(x, mask)
    yield "ppo_policy_loss", lambda: ops.ppo_policy_loss(x, x, x, mask)
    yield "ppo_value_loss", lambda: ops.ppo_value_loss(x, x, x, mask)
    yield "fused_ppo_loss", lambda: call_fused(mask=mask)
    yield "fused_linear_ppo_loss", lambda: ops.fused_linear_ppo_loss(
        torch.randn(2, 3, 4), torch.randn(5, 4), kw["labels"], x, x, mask)


@pytest.mark.parametrize("bad, shown", [(0.5, "0.5"), (2.0, "2.0"), (-1.0, "-1.0"), (float("nan"), "nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.float16])
def test_mask_values_other_than_0_and_1_are_refused(bad, shown, dtype):
    if not dtype.is_floating_point and (bad != bad or bad != int(bad)):
        pytest.skip("an integer mask cannot hold it")
    mask = torch.ones(2, 3, dtype=dtype)
    mask[1, 2] = 0
    mask[1, 1] = bad
    shown = shown if dtype.is_floating_point else str(int(bad))
    for op, call in _mask_calls(mask):
        with pytest.raises(ValueError, match=rf"mask: expected only 0 and 1 .*got {shown} at index \(1, 1\)"):
            call()


def test_masks_of_0_and_1_in_every_dtype_are_accepted():
    for dtype in (torch.bool, torch.int32, torch.int64, torch.float16, torch.float32):
        mask = torch.tensor([[1, 0, 1], [0, 0, 1]]).to(dtype)
        for op, call in _mask_calls(mask):
            call()
