"""The reference log-prob, entropy, KL and linear ops against their textbook definitions."""
import pytest
import torch

from rlhf_fast import reference as R
from rlhf_fast.reference import logprobs as logprobs_module


def definition_logp_entropy(logits, labels, temperature=1.0):
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_logprobs_and_entropy_match_definition(temperature):
    torch.manual_seed(0)
    logits = torch.randn(37, 101) * 3
    labels = torch.randint(0, 101, (37,))
    want_logp, want_entropy = definition_logp_entropy(logits, labels, temperature)
    logp, entropy = R.logprobs_and_entropy(logits, labels, temperature=temperature)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp.double(), want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy.double(), want_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R.selective_log_softmax(logits, labels, temperature=temperature), logp)


def test_hand_worked_uniform_row():
    logits = torch.zeros(1, 4)
    logp, entropy = R.logprobs_and_entropy(logits, torch.tensor([3]))
    torch.testing.assert_close(logp, torch.log(torch.tensor([0.25])))
    torch.testing.assert_close(entropy, torch.log(torch.tensor([4.0])))


def test_large_logits_and_edge_labels_are_finite():
    logits = torch.tensor([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]], dtype=torch.float16)
    logp, entropy = R.logprobs_and_entropy(logits, torch.tensor([0, 2]))
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logp, torch.zeros(2))


def test_row_chunking_is_invisible(monkeypatch):
    torch.manual_seed(1)
    logits, labels = torch.randn(10, 13), torch.randint(0, 13, (10,))
    whole = R.logprobs_and_entropy(logits, labels)
    monkeypatch.setattr(logprobs_module, "ROW_CHUNK", 3)
    chunked = R.logprobs_and_entropy(logits, labels)
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_logprob_entropy_gradients_float64():
    torch.manual_seed(2)
    logits = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 9, (6,))
    assert torch.autograd.gradcheck(lambda z: R.logprobs_and_entropy(z, labels, temperature=0.8), (logits,))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_token_kl_estimators(estimator):
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -0.1])
    r = logp - ref
    want = {"k1": r, "k2": 0.5 * r**2, "k3": torch.exp(-r) - 1 + r}[estimator]
    torch.testing.assert_close(R.token_kl(logp, ref, estimator=estimator), want)
    x = logp.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: R.token_kl(a, ref.double(), estimator=estimator), (x,))


def test_k3_is_an_unbiased_nonnegative_kl_estimate():
    torch.manual_seed(3)
    p_logits, q_logits = torch.randn(50), torch.randn(50)
    logp, logq = torch.log_softmax(p_logits, 0), torch.log_softmax(q_logits, 0)
    exact = (logp.exp() * (logp - logq)).sum()
    samples = torch.multinomial(logp.exp(), 200_000, replacement=True)
    k3 = R.token_kl(logp[samples], logq[samples], estimator="k3")
    assert (k3 >= 0).all()
    torch.testing.assert_close(k3.mean(), exact.float(), atol=0.02, rtol=0.05)


@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_logprobs_match_materialised_logits(with_bias):
    torch.manual_seed(4)
    hidden, weight = torch.randn(23, 8), torch.randn(31, 8)
    bias = torch.randn(31) if with_bias else None
    labels = torch.randint(0, 31, (23,))
    logits = hidden @ weight.t() + (bias if with_bias else 0)
    want_logp, want_entropy = R.logprobs_and_entropy(logits, labels, temperature=1.3)
    logp, entropy = R.linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=1.3, return_entropy=True, chunk_size=5
    )
    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, atol=1e-5, rtol=1e-5)


def test_linear_logprobs_gradients_float64():
    torch.manual_seed(5)
    h = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (7,))

    def f(h, w, b):
        return R.linear_logprobs(h, w, labels, bias=b, temperature=0.6, return_entropy=True, chunk_size=3)

    assert torch.autograd.gradcheck(f, (h, w, b))


def test_linear_logprobs_tied_embedding_gradient_accumulates():
    torch.manual_seed(6)
    embed = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (5,))
    labels = torch.randint(0, 9, (5,))
    hidden = embed[tokens] * 2  # the same tensor feeds the input side and the LM head
    R.linear_logprobs(hidden, embed, labels).sum().backward()
    fused = embed.grad.clone()
    embed.grad = None
    torch.log_softmax((embed[tokens] * 2) @ embed.t(), -1).gather(-1, labels[:, None]).sum().backward()
    torch.testing.assert_close(fused, embed.grad)
