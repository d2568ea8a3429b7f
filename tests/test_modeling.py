"""rlhf_fast.modeling against a tiny LlamaForCausalLM's own logits (built from a config, no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf_fast import ops  # noqa: E402
from rlhf_fast.modeling import CausalLMWithValueHead, FusedLinearLM, hidden_and_lm_head, sequence_logprobs  # noqa: E402

B, T, V = 2, 13, 101


def _model(tie=False, seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a random init gives near-uniform logits; spread them so errors would show
        model.lm_head.weight.mul_(8.0)
    return model


def _ids(seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits_logprobs(model, ids, mask=None, temperature=1.0):
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def test_hidden_and_lm_head_reproduce_logits():
    model = _model()
    ids = _ids()
    hidden, weight, bias = hidden_and_lm_head(model, ids)
    assert hidden.shape == (B, T, 32) and weight.shape == (V, 32) and bias is None
    assert weight is model.lm_head.weight
    torch.testing.assert_close(hidden @ weight.t(), model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["reference", "triton"])
def test_sequence_logprobs_matches_logits(use_kernel, backend):
    backend("triton" if use_kernel else "torch")
    model = _model()
    ids = _ids()
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0  # left padding on the second row
    logp, ent = sequence_logprobs(model, ids, mask, temperature=0.8, return_entropy=True)
    logp_r, ent_r = _logits_logprobs(model, ids, mask, temperature=0.8)
    assert logp.shape == (B, T - 1) and logp.dtype == torch.float32
    torch.testing.assert_close(logp, logp_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ent_r, atol=1e-5, rtol=1e-5)
    # without return_entropy: just the log-probs
    torch.testing.assert_close(sequence_logprobs(model, ids, mask, temperature=0.8), logp_r, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_gradients(backend):
    """Tied head: the gradient through the head and through the embedding lookup both reach the one matrix."""
    backend("triton")
    model = _model(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids(seed=2)
    logp, ent = sequence_logprobs(model, ids, return_entropy=True)
    (logp.sum() + 0.5 * ent.sum()).backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logp_r, ent_r = _logits_logprobs(model, ids)
    (logp_r.sum() + 0.5 * ent_r.sum()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_logit_transforms_are_refused():
    model = _model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="final_logit_softcapping"):
        hidden_and_lm_head(model, _ids())
    model = _model()
    model.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match="logit_scale"):
        sequence_logprobs(model, _ids())
    with pytest.raises(ValueError, match="input_ids"):
        hidden_and_lm_head(_model(), _ids()[0])


def _ppo_inputs(seed=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, T - 1)
    mask[0, -3:] = 0
    return dict(old_logp=-5 - torch.rand(B, T - 1, generator=g), advantages=torch.randn(B, T - 1, generator=g),
                mask=mask, ref_logp=-5 - torch.rand(B, T - 1, generator=g), kl_coef=0.3, entropy_coef=0.02)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fused_linear_lm_is_the_model_under_the_same_names(tie):
    """The module DDP / FSDP2 wrap for logprobs_from_hidden: the model's parameters under the model's names (so
    checkpoints and optimizer state do not depend on it), a tied matrix still one parameter, train / eval
    reaching the model object too."""
    model = _model(tie=tie)
    runner = FusedLinearLM(model)
    assert [(n, id(p)) for n, p in runner.named_parameters()] == [(n, id(p)) for n, p in model.named_parameters()]
    assert list(runner.state_dict()) == list(model.state_dict())
    assert (runner.lm_head.weight is runner.model.embed_tokens.weight) == tie
    assert not runner.training and not model.training  # follows the (eval) model it was built from
    runner.train()
    assert model.training and all(m.training for m in model.modules())
    runner.eval()
    assert not model.training and not any(m.training for m in model.modules())


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_fused_linear_lm_forward_equals_the_bare_model_path(tie, backend):
    """Its forward gives exactly (bitwise) the log-probs, loss, stats and gradients of calling
    hidden_and_lm_head / sequence_logprobs on the bare model, so one-process training is unchanged."""
    backend("torch")
    model = _model(tie=tie)
    runner = FusedLinearLM(model)
    ids = _ids(seed=3)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, -3:] = 0
    with torch.no_grad():
        assert torch.equal(runner(ids, attention, temperature=0.7), sequence_logprobs(model, ids, attention,
                                                                                       temperature=0.7))
    inputs = _ppo_inputs()
    loss, stats = runner(ids, attention, temperature=0.7, ppo_loss=inputs)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden, weight, bias = hidden_and_lm_head(model, ids, attention)
    old, adv, mask = inputs.pop("old_logp"), inputs.pop("advantages"), inputs.pop("mask")
    loss_r, stats_r = ops.fused_linear_ppo_loss(hidden[:, :-1], weight, ids[:, 1:], old, adv, mask, bias=bias,
                                                temperature=0.7, **inputs)
    loss_r.backward()
    assert torch.equal(loss, loss_r)
    assert sorted(stats) == sorted(stats_r) and all(torch.equal(stats[k], stats_r[k]) for k in stats)
    for name, p in model.named_parameters():
        assert p.grad.abs().sum() > 0, name  # every parameter is used inside forward (what DDP expects)
        assert torch.equal(ours[name], p.grad), name


def test_fused_linear_lm_generate_and_refusals():
    model = _model()
    runner = FusedLinearLM(model)
    ids = _ids()[:1, :5]
    torch.testing.assert_close(runner.generate(input_ids=ids, max_new_tokens=3, do_sample=False),
                               model.generate(input_ids=ids, max_new_tokens=3, do_sample=False))
    model.register_parameter("logit_bias", torch.nn.Parameter(torch.zeros(V)))
    with pytest.raises(NotImplementedError, match="logit_bias"):
        FusedLinearLM(model)


def _with_head(tie=False, from_hidden=False, seed=7):
    return CausalLMWithValueHead(_model(tie=tie), from_hidden=from_hidden,
                                 generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_value_head_module_is_the_model_plus_one_head(tie):
    """The PPO critic="value_head" module: the model's parameters under the model's names, then the head; a small,
    seed-determined init (the same on every rank), zero bias."""
    model = _model(tie=tie)
    runner = CausalLMWithValueHead(model, generator=torch.Generator().manual_seed(7))
    names = [n for n, _ in runner.named_parameters()]
    assert names == [n for n, _ in model.named_parameters()] + ["value_head.weight", "value_head.bias"]
    assert runner.value_head.weight.shape == (1, 32) and torch.equal(runner.value_head.bias, torch.zeros(1))
    assert float(runner.value_head.weight.detach().abs().max()) < 5 / 33  # std 1 / (H + 1): small
    assert torch.equal(runner.value_head.weight, _with_head(tie=tie).value_head.weight)
    assert not torch.equal(runner.value_head.weight, _with_head(tie=tie, seed=8).value_head.weight)
    assert not hasattr(model, "value_head")


@pytest.mark.parametrize("from_hidden", [False, True], ids=["logits", "from-hidden"])
def test_value_head_forward_gives_logprobs_values_and_the_ppo_loss(from_hidden, backend):
    """One forward: the log-probs of the model (its logits, or the fused linear path), the head on the last
    hidden states, and the PPO loss of rlhf_fast.ops; the loss and the values reach every parameter."""
    backend("torch")
    runner = _with_head(from_hidden=from_hidden)
    model = runner.lm
    ids = _ids(seed=3)
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, -3:] = 0
    hidden = model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    expected_values = runner.value_head(hidden).squeeze(-1)
    if from_hidden:
        expected_logp = sequence_logprobs(model, ids, attention, temperature=0.7)
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        expected_logp = ops.selective_log_softmax(logits, ids[:, 1:], temperature=0.7)
    with torch.no_grad():
        logp, values = runner(ids, attention, temperature=0.7)
    assert logp.shape == (B, T - 1) and values.shape == (B, T) and values.dtype == torch.float32
    torch.testing.assert_close(logp, expected_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(values, expected_values, atol=1e-6, rtol=1e-6)

    inputs = _ppo_inputs()
    loss, stats, values = runner(ids, attention, temperature=0.7, ppo_loss=dict(inputs))
    old, adv, mask = inputs.pop("old_logp"), inputs.pop("advantages"), inputs.pop("mask")
    with torch.no_grad():
        if from_hidden:
            h, weight, bias = hidden_and_lm_head(model, ids, attention)
            loss_r, _ = ops.fused_linear_ppo_loss(h[:, :-1], weight, ids[:, 1:], old, adv, mask, bias=bias,
                                                  temperature=0.7, **inputs)
        else:
            loss_r, _ = ops.fused_ppo_loss(model(input_ids=ids, attention_mask=attention).logits[:, :-1], ids[:, 1:],
                                           old, adv, mask, temperature=0.7, **inputs)
    torch.testing.assert_close(loss, loss_r, atol=1e-6, rtol=1e-6)
    assert "clip_frac" in stats
    (loss + values[:, :-1].pow(2).mean()).backward()
    for name, p in runner.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the head's gradient is that of the value term alone: d mean(v^2) / dw = mean(2 v h)
    v = expected_values.detach()[:, :-1]
    grad_w = (2 * v.unsqueeze(-1) * hidden.detach()[:, :-1]).sum((0, 1)) / v.numel()
    torch.testing.assert_close(runner.value_head.weight.grad[0], grad_w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_disable_dropout_makes_train_mode_deterministic(kind):
    """nn.Dropout modules (GPT-2) and dropout rates copied into attention modules at construction (Llama's
    ``self.attention_dropout``) are both set to 0, and so are the config fields."""
    from rlhf_fast.modeling import disable_dropout

    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.2, embd_pdrop=0.2,
            attn_pdrop=0.2, bos_token_id=0, eos_token_id=1))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attention_dropout=0.5))
    ids = _ids()
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is on
    assert disable_dropout(model) is model
    train_logits = model(input_ids=ids).logits
    assert torch.equal(train_logits, model(input_ids=ids).logits)
    torch.testing.assert_close(train_logits, model.eval()(input_ids=ids).logits, rtol=0, atol=0)
    rates = {k: v for k, v in vars(model.config).items() if "drop" in k and isinstance(v, float)}
    assert rates and set(rates.values()) == {0.0}, rates


def test_head_runs_in_the_autocast_dtype(monkeypatch):
    """Under autocast the fused head gets the autocast dtype, as nn.Linear would (an fp32 model under bf16
    autocast must not take the fp32 kernels), for log-probs and for the PPO loss; gradients still reach the fp32
    parameters. Outside autocast: the weight's dtype."""
    model = _model(seed=3)
    runner = FusedLinearLM(model)
    seen = []
    for name in ("linear_logprobs", "fused_linear_ppo_loss"):
        real = getattr(ops, name)

        def spy(hidden, weight, *args, _real=real, **kwargs):
            seen.append((hidden.dtype, weight.dtype))
            return _real(hidden, weight, *args, **kwargs)

        monkeypatch.setattr(ops, name, spy)
    ids = _ids(4)
    zeros = torch.zeros(B, T - 1)
    ppo = dict(old_logp=zeros, advantages=torch.ones(B), mask=torch.ones(B, T - 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sequence_logprobs(model, ids).sum().backward()
        runner(ids, ppo_loss=ppo)[0].backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert model.lm_head.weight.grad.dtype == torch.float32 and model.lm_head.weight.grad.abs().sum() > 0
    seen.clear()
    sequence_logprobs(model, ids)
    assert seen == [(torch.float32, torch.float32)]
