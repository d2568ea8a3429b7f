"""A +inf logit: the Triton kernels give what the reference gives, forward and backward.

The reference's log-sum-exp of a row with a +inf logit is +inf, so a finite label's log-prob is -inf (the
online log-sum-exp of the kernels made it nan: inf - inf); the +inf label's log-prob and the entropy are nan on
both. A row that carries gradient gets the reference's gradient: nan at the +inf logit, and over the whole row
when the (nan) entropy is in the backward.
On CPU the kernels run under TRITON_INTERPRET=1 with 64-column vocabulary chunks (conftest), so the +inf logits
below sit in different chunks of a row.
"""
import os

import pytest
import torch

from rlhf_fast import ops
from rlhf_fast import reference as ref

V = 150
INF = float("inf")


@pytest.fixture(autouse=True)
def triton_backend(triton_small_chunks):
    """Every test here runs the Triton kernels (interpreter on CPU, small vocabulary chunks)."""


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _logits(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, V, generator=g) * 2
    logits[0, 3] = INF  # a +inf in the first chunk, the label elsewhere
    logits[1, 70] = logits[1, 140] = INF  # two, in later chunks; the label on one of them
    logits[2, 100] = INF  # after the label's chunk
    logits[3, 9] = -INF  # no +inf: an ordinary row
    labels = torch.tensor([0, 70, 5, 1, 149])
    return logits.to(device=_device(), dtype=dtype), labels.to(_device())


def _forward_backward(op, logits, labels, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    out = op(x, labels, **kwargs)
    out = out if isinstance(out, tuple) else (out,)
    grads = [torch.linspace(0.5, 1.5, o.numel(), device=o.device).view(o.shape) for o in out]
    torch.autograd.backward(out, grads)
    return [o.detach() for o in out], x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["selective_log_softmax", "logprobs_and_entropy"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_plus_inf_logits_match_the_reference(name, dtype, temperature):
    logits, labels = _logits(dtype)
    out, grad = _forward_backward(getattr(ops, name), logits, labels, temperature=temperature)
    ref_out, ref_grad = _forward_backward(getattr(ref, name), logits.float(), labels, temperature=temperature)
    assert out[0][0] == -INF and out[0][2] == -INF  # a finite label next to a +inf logit
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5, equal_nan=True)
    # The gradient is nan at a +inf logit; with the entropy in the backward, over the whole row (both sides).
    assert torch.isnan(grad[0, 3]) and grad[0, 0] != 0 and torch.isnan(grad[2]).any()
    torch.testing.assert_close(grad.float(), ref_grad, atol=2e-2, rtol=2e-2, equal_nan=True)


def test_a_masked_row_with_a_plus_inf_logit_still_gets_a_zero_gradient():
    # Rows whose upstream gradient is 0 are never read (masked tokens): their gradient is exactly 0, as before.
    logits, labels = _logits()
    x = logits.clone().requires_grad_(True)
    logp = ops.selective_log_softmax(x, labels)
    (logp * torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], device=x.device)).sum().backward()
    assert (x.grad[:2] == 0).all() and torch.isnan(x.grad[2, 100])


def test_fused_ppo_loss_with_a_plus_inf_logit_matches_the_reference():
    logits, labels = _logits()
    logits, labels = logits.view(1, 5, V), labels.view(1, 5)
    old = torch.full((1, 5), -2.0, device=logits.device)
    adv = torch.tensor([[1.0, -0.5, 0.7, 0.3, -1.2]], device=logits.device)
    mask = torch.tensor([[1, 0, 1, 1, 1]], device=logits.device)  # the nan (+inf label) token is masked out
    kwargs = dict(old_logp=old, advantages=adv, mask=mask, inplace_grad=False)
    loss, stats = ops.fused_ppo_loss(logits.clone(), labels, **kwargs)
    ref_loss, ref_stats = ref.fused_ppo_loss(logits.clone(), labels, **kwargs)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    for key in ref_stats:
        torch.testing.assert_close(stats[key], ref_stats[key], atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs the Triton interpreter or a GPU")
@pytest.mark.parametrize("return_entropy", [False, True])
def test_linear_logprobs_with_a_plus_inf_bias_match_the_reference(return_entropy):
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(6, 24, generator=g), torch.randn(V, 24, generator=g) * 0.3
    bias = torch.zeros(V)
    bias[77] = INF  # every token's logit 77 is +inf
    labels = torch.tensor([0, 77, 5, 149, 76, 78])
    results = []
    for impl in (ops.linear_logprobs, ref.linear_logprobs):
        h, w, b = (t.to(_device()).clone().requires_grad_(True) for t in (hidden, weight, bias))
        out = impl(h, w, labels.to(_device()), bias=b, return_entropy=return_entropy)
        out = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward(out, [torch.linspace(0.5, 1.5, 6, device=h.device) for _ in out])
        results.append(([o.detach() for o in out], h.grad, w.grad, b.grad))
    (out, *grads), (ref_out, *ref_grads) = results
    assert out[0][0] == -INF and torch.isnan(out[0][1])
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-5, equal_nan=True)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, equal_nan=True)
