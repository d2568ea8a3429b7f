"""Packed rows through transformers models: each sequence attends only to itself, exactly, without an [N, N] mask.

Three architectures from tiny configs (Llama with grouped-query attention, Qwen2 with a sliding window shorter than
some sequences, GPT-NeoX); packed logits and gradients equal running each sequence alone (an independent
per-sequence computation) and the padded batch; padded batches and generation are unchanged by the switch."""
import pytest
import torch

from rlhf_fast import packed_attention
from rlhf_fast.trainers.packed import MicroBatch

LENGTHS = [6, 1, 11, 3, 8]


def _model(kind):
    import transformers as tf

    common = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **common))
    if kind == "qwen2-sliding":
        config = tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                max_window_layers=0, **common)
        return tf.Qwen2ForCausalLM(config)
    return tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**common))


def _sequences():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 40, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.mark.parametrize("kind", ["llama", "qwen2-sliding", "neox"])
def test_packed_forward_equals_each_sequence_alone_and_padded(kind):
    model = _model(kind).eval()
    sequences = _sequences()
    rows = list(range(len(sequences)))
    alone = [model(input_ids=torch.tensor([s])).logits[0] for s in sequences]  # before the switch: plain sdpa
    padded = MicroBatch(sequences, rows, packed=False, pad_id=0, device="cpu")
    padded_logits = model(**padded.model_inputs()).logits
    packed_attention.enable_packed_attention(model)
    assert packed_attention.is_packed_attention_enabled(model)
    packed = MicroBatch(sequences, rows, packed=True, pad_id=0, device="cpu")
    logits = model(**packed.model_inputs()).logits[0]
    torch.testing.assert_close(logits, torch.cat(alone), atol=2e-5, rtol=1e-5)
    for i, n in enumerate(LENGTHS):
        torch.testing.assert_close(padded_logits[i, :n], alone[i], atol=2e-5, rtol=1e-5)
    # the padded batch and generation still run the previous implementation, with their masks
    after = model(**padded.model_inputs()).logits
    torch.testing.assert_close(after, padded_logits, atol=1e-6, rtol=1e-6)
    prompt = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    out = model.generate(input_ids=prompt, attention_mask=(prompt != 0).long() | torch.tensor([[0], [1]]),
                         max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)


@pytest.mark.parametrize("kind", ["llama", "neox"])
def test_packed_gradients_equal_per_sequence(kind):
    model = _model(kind).train()
    sequences = _sequences()
    targets = [torch.randn(n, 40, generator=torch.Generator().manual_seed(n)) for n in LENGTHS]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    alone = grads(sum((model(input_ids=torch.tensor([s])).logits[0] * t).sum() for s, t in zip(sequences, targets)))
    packed_attention.enable_packed_attention(model)
    batch = MicroBatch(sequences, list(range(len(sequences))), packed=True, pad_id=0, device="cpu")
    packed = grads((model(**batch.model_inputs()).logits[0] * torch.cat(targets)).sum())
    for name in alone:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-4, rtol=1e-4, msg=name)


def test_no_square_mask_is_built(monkeypatch):
    """The packed forward never asks sdpa for a mask (which would be [N, N] block-diagonal)."""
    import transformers.masking_utils as mu

    model = _model("llama").eval()
    packed_attention.enable_packed_attention(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a dense mask was requested for a packed row")

    monkeypatch.setitem(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa", refuse)
    batch = MicroBatch(_sequences(), [0, 2, 4], packed=True, pad_id=0, device="cpu")
    model(**batch.model_inputs())
    with pytest.raises(AssertionError, match="dense mask"):  # the padded path still goes through sdpa's mask
        padded = MicroBatch(_sequences(), [0, 2, 4], packed=False, pad_id=0, device="cpu")
        model(**padded.model_inputs())


def test_models_that_cannot_be_packed_are_refused():
    import transformers as tf

    gemma = tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=40, hidden_size=32, intermediate_size=48,
                                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=8, attn_logit_softcapping=50.0))
    assert "soft-caps" in packed_attention.packing_unsupported_reason(gemma)
    with pytest.raises(NotImplementedError, match="padding_free: Gemma2ForCausalLM cannot run on packed rows"):
        packed_attention.enable_packed_attention(gemma)
    assert "not a transformers model" in packed_attention.packing_unsupported_reason(torch.nn.Linear(2, 2))


def test_micro_batch_layouts_round_trip():
    sequences = _sequences()
    rows = [4, 0, 2]
    width = max(LENGTHS) - 1
    table = torch.arange(len(sequences) * width, dtype=torch.float32).reshape(len(sequences), width) + 1
    for packed in (False, True):
        batch = MicroBatch(sequences, rows, packed=packed, pad_id=0, device="cpu")
        values = batch.take(table)
        assert values.shape == batch.input_ids.shape
        back = batch.to_rows(values, width)
        for i, row in enumerate(rows):
            n = LENGTHS[row] - 1
            torch.testing.assert_close(back[i, :n], table[row, :n])
            assert (back[i, n:] == 0).all()
        lasts = batch.last_token(batch.input_ids.float())
        assert lasts.tolist() == [float(sequences[r][-1]) for r in rows]
        labels = batch.take(torch.tensor([s[1:] + [0] * (width + 1 - len(s)) for s in sequences]).float())
        torch.testing.assert_close(labels * (labels != 0), batch.labels.float() * (labels != 0))
