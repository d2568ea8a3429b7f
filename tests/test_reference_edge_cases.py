"""Edge cases of the reference (the CPU default and the oracle): empty batches, non-finite values where they
are legal, and which inputs carry gradients."""
import pytest
import torch

from rlhf_fast import ops
from rlhf_fast.reference import AGG_MODES


@pytest.fixture(autouse=True)
def reference_backend(backend):
    backend("torch")


@pytest.mark.parametrize("shape", [(2, 0), (0, 3), (0,)])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_empty_batches_give_zero(shape, agg):
    logits = torch.randn(*shape, 5, requires_grad=True)
    zeros = torch.zeros(shape)
    labels = torch.zeros(shape, dtype=torch.long)
    loss, stats = ops.fused_ppo_loss(logits, labels, zeros, zeros, zeros, agg=agg, entropy_coef=0.1)
    assert loss.item() == 0.0 and all(torch.isfinite(s) for s in stats.values())
    loss.backward()
    hidden, weight = torch.randn(*shape, 4), torch.randn(5, 4)
    loss, _ = ops.fused_linear_ppo_loss(hidden, weight, labels, zeros, zeros, zeros, agg=agg)
    assert loss.item() == 0.0


def test_only_the_policy_log_probs_carry_gradients():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 7, requires_grad=True)
    old, ref, adv, isw = (torch.randn(2, 3, requires_grad=True) for _ in range(4))
    labels = torch.randint(0, 7, (2, 3))
    loss, _ = ops.fused_ppo_loss(logits, labels, old, adv, torch.ones(2, 3), ref_logp=ref, kl_coef=0.1,
                                 is_weights=isw)
    loss.backward()
    assert logits.grad is not None
    assert old.grad is None and ref.grad is None and adv.grad is None and isw.grad is None
    values, old_v, returns = (torch.randn(2, 3, requires_grad=True) for _ in range(3))
    vloss, _ = ops.ppo_value_loss(values, old_v, returns, torch.ones(2, 3))
    vloss.backward()
    assert values.grad is not None and old_v.grad is None and returns.grad is None


def test_minus_inf_logits_give_finite_entropy_and_gradients():
    logits = torch.tensor([[0.5, float("-inf"), 1.0, float("-inf")]], requires_grad=True)
    logp, entropy = ops.logprobs_and_entropy(logits, torch.tensor([2]))
    p = torch.softmax(torch.tensor([0.5, 1.0]), 0)
    torch.testing.assert_close(entropy, -(p * p.log()).sum().reshape(1))
    (logp + entropy).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[0, 1] == 0 and logits.grad[0, 3] == 0


def test_linear_entropy_with_minus_inf_bias_is_finite():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4, requires_grad=True)
    bias = torch.tensor([0.0, float("-inf"), 0.0, 0.0, 0.0])
    logp, entropy = ops.linear_logprobs(hidden, weight, torch.tensor([0, 2, 4]), bias=bias, return_entropy=True)
    (logp + entropy).sum().backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(weight.grad).all()


def test_non_finite_values_under_the_mask_do_not_leak():
    mask = torch.tensor([[1, 1, 1, 0]])
    x = torch.tensor([[1.0, 2.0, 3.0, float("nan")]])
    torch.testing.assert_close(ops.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, -0.4, float("-inf")]])  # padding with a -inf log-prob
    adv = torch.tensor([[1.0, -1.0, 0.5, float("nan")]])
    loss, stats = ops.ppo_policy_loss(logp, old, adv, mask)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(s) for s in stats.values())
    assert torch.isfinite(logp.grad).all() and logp.grad[0, 3] == 0
    values = torch.zeros(1, 4, requires_grad=True)
    vloss, _ = ops.ppo_value_loss(values, torch.zeros(1, 4), torch.tensor([[1.0, 2.0, 3.0, float("nan")]]), mask)
    vloss.backward()
    assert torch.isfinite(vloss) and torch.isfinite(values.grad).all()


def test_count_overrides_given_as_number_or_tensor_agree():
    torch.manual_seed(1)
    logp, old, adv = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    mask = torch.ones(3, 4)
    as_number, _ = ops.ppo_policy_loss(logp, old, adv, mask, num_tokens=0.5)
    as_tensor, _ = ops.ppo_policy_loss(logp, old, adv, mask, num_tokens=torch.tensor(0.5))
    torch.testing.assert_close(as_number, as_tensor)


@pytest.mark.parametrize(
    "call,pattern",
    [
        (lambda: ops.ppo_policy_loss(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)),
         r"logp: expected a per-token tensor \[N\] or \[\*, T\], got shape \(\)"),
        (lambda: ops.ppo_value_loss(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0)),
         r"values: expected a per-token tensor"),
        (lambda: ops.linear_logprobs(torch.zeros(3, 0), torch.zeros(5, 0), torch.zeros(3, dtype=torch.long)),
         r"hidden: expected a non-empty hidden dimension H"),
        (lambda: ops.ppo_policy_loss(*[torch.zeros(2, 3)] * 3, torch.ones(2, 3), num_tokens=torch.tensor(0.0)),
         r"num_tokens: expected a value > 0"),
        (lambda: ops.ppo_policy_loss(*[torch.zeros(2, 3)] * 3, torch.ones(2, 3), num_seqs=torch.tensor(float("nan"))),
         r"num_seqs: expected a finite number, got nan"),
        (lambda: ops.ppo_policy_loss(*[torch.zeros(2, 3)] * 3, torch.ones(2, 3), loss_scale=float("inf")),
         r"loss_scale: expected a finite number, got inf"),
        (lambda: ops.selective_log_softmax(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), temperature=float("inf")),
         r"temperature: expected a finite number, got inf"),
    ],
)
def test_degenerate_arguments_are_refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()
