"""Helpers between Hugging Face causal LMs and the fused linear ops.

The trainer never asks a model for its ``[B, T, V]`` logits: it runs the decoder body, takes the last hidden
state (after the final norm) and the LM head, and hands both to ``rlhf_fast.ops.linear_logprobs`` /
``fused_linear_ppo_loss``, which never hold the logits either. Under DDP / FSDP2 the trainers run this inside
``FusedLinearLM``'s forward, the module the wrapper holds.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import ops

# Config attributes of models whose logits are not ``lm_head(hidden)``: (attribute, value meaning "off").
_LOGIT_TRANSFORMS = (
    ("final_logit_softcapping", (None, 0, 0.0)),  # Gemma 2 / 3: tanh soft-capping
    ("logit_softcapping", (None, 0, 0.0)),
    ("logit_scale", (None, 1, 1.0)),  # Cohere: logits * logit_scale
    ("logits_scaling", (None, 1, 1.0)),  # Granite: logits / logits_scaling
    ("lm_head_multiplier", (None, 1, 1.0)),  # Falcon-H1: logits * lm_head_multiplier
    ("output_multiplier_scale", (None, 1, 1.0)),
)


def _configs(model):
    config = getattr(model, "config", None)
    if config is None:
        return []
    found = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        text = get_text()
        if text is not None and text is not config:
            found.append(text)
    return found


def _check_plain_lm_head(model) -> None:
    for config in _configs(model):
        for attr, off in _LOGIT_TRANSFORMS:
            value = getattr(config, attr, None)
            if value not in off:
                raise NotImplementedError(
                    f"hidden_and_lm_head: {type(model).__name__} transforms its logits after the LM head "
                    f"(config.{attr} = {value!r}); the fused linear ops compute plain hidden @ weight.T + bias "
                    f"logits, so they would give different log-probs. Use the model's logits for this model."
                )


_DROPOUT_NAMES = ("dropout", "pdrop", "layerdrop")  # config fields / module attributes that hold a drop rate


def _is_rate(name: str, value) -> bool:
    return (isinstance(value, float) and not isinstance(value, bool)
            and any(part in name.lower() for part in _DROPOUT_NAMES))


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Turn dropout off in ``model`` for good, in train mode too (TRL's ``disable_dropout_in_model``, extended).

    Sets ``p = 0`` in every ``nn.Dropout``-family module, every float attribute of a module whose name holds
    ``dropout``, ``pdrop`` or ``layerdrop`` (attention modules that copy ``config.attention_dropout`` into
    ``self.attention_dropout`` at construction and pass it to the attention kernel in train mode), and the same
    fields of the model's config (and its text config), so that what is saved or rebuilt from the config has no
    dropout either. Returns ``model``.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if not name.startswith("_") and _is_rate(name, value):
                setattr(module, name, 0.0)
    for config in _configs(model):
        for name, value in list(vars(config).items()):
            if not name.startswith("_") and _is_rate(name, value):
                setattr(config, name, 0.0)
    return model


def _decoder(model):
    get_decoder = getattr(model, "get_decoder", None)
    body = get_decoder() if callable(get_decoder) else None
    if body is None or body is model:
        prefix = getattr(model, "base_model_prefix", "") or "model"
        body = getattr(model, prefix, None) or getattr(model, "model", None)
    if body is None or body is model:
        raise NotImplementedError(
            f"hidden_and_lm_head: expected a causal LM with a decoder body (get_decoder(), .model or "
            f".{getattr(model, 'base_model_prefix', 'model')}), got {type(model).__name__}"
        )
    return body


def hidden_and_lm_head(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    position_ids: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Run the causal LM's body: ``(hidden[B, T, H] after the final norm, lm_head weight[V, H], bias or None)``.

    Tied embeddings need nothing special: the returned weight *is* the embedding matrix, so gradients from the
    head and from the embedding lookup add up in its ``.grad``. Models that transform logits after the head
    (soft-capping, logit scales) raise ``NotImplementedError`` instead of giving silently different numbers.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected a 2-d tensor [B, T], got {shape}")
    _check_plain_lm_head(model)
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise NotImplementedError(
            f"hidden_and_lm_head: expected get_output_embeddings() to be a linear layer with weight [V, H], "
            f"got {type(head).__name__}"
        )
    bias = getattr(head, "bias", None)
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    out = _decoder(model)(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if hidden.dim() != 3 or hidden.shape[-1] != weight.shape[1]:
        raise NotImplementedError(
            f"hidden_and_lm_head: the decoder body gave hidden states of shape {tuple(hidden.shape)}, "
            f"expected [B, T, {weight.shape[1]}] to match the LM head weight {tuple(weight.shape)}"
        )
    return hidden, weight, bias


def head_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """``hidden``, ``weight`` and ``bias`` in the one dtype the LM head would run in: inside an autocast region,
    the autocast dtype (as ``nn.Linear`` would run the head there: an fp32 model under bf16 autocast must not
    take the fp32 kernels, which cannot use bf16 tensor cores); else the weight's (e.g. an fp32 final norm on a
    low-precision head). The casts are differentiable: gradients reach the parameters in their own dtype."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype

    def cast(t):
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return cast(hidden), cast(weight), cast(bias)


def sequence_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    position_ids: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
):
    """``logp[B, T-1] = log p(input_ids[:, t+1] | input_ids[:, <= t])`` (float32), and the entropy of each of
    those next-token distributions with ``return_entropy=True``; computed by ``rlhf_fast.ops.linear_logprobs``
    from the hidden states, never from ``[B, T, V]`` logits. Differentiable in the model's parameters.
    Positions under padding (``attention_mask == 0``) get finite values the caller is expected to mask out.

    ``labels[B, T]``: the next token of every position (a packed row: ``position_ids`` restart in each sequence and
    the last token of each sequence has no next token of its own): ``logp[B, T]`` of those labels instead.
    """
    hidden, weight, bias = head_operands(*hidden_and_lm_head(model, input_ids, attention_mask, position_ids))
    hidden, labels = _next_token(hidden, input_ids, labels)
    return ops.linear_logprobs(
        hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=return_entropy,
    )


def _next_token(per_position: torch.Tensor, input_ids: torch.Tensor, labels: Optional[torch.Tensor]):
    """``(per_position[:, :-1], input_ids[:, 1:])``, or every position with the caller's ``labels[B, T]``."""
    if labels is None:
        return per_position[:, :-1], input_ids[:, 1:]
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} (the shape of input_ids: the next token "
                         f"of every position), got {tuple(labels.shape)}")
    return per_position, labels


class FusedLinearLM(torch.nn.Module):
    """A causal LM whose ``forward`` runs the body *and* the fused linear ops on its own LM head.

    DDP all-reduces the gradients of, and FSDP2 gathers the parameters for, what a module's own ``forward``
    uses; calling the body and reading ``lm_head.weight`` around the wrapper (as ``hidden_and_lm_head`` on the
    bare model does) would escape both. The trainers therefore wrap this module when log-probs come from the
    hidden states:

    - ``forward(input_ids, attention_mask)``: ``sequence_logprobs`` of the model (``temperature``,
      ``return_entropy`` as there);
    - ``forward(input_ids, attention_mask, ppo_loss={old_logp, advantages, mask, ...})``: ``(loss, stats)`` of
      ``ops.fused_linear_ppo_loss(hidden[:, :-1], weight, input_ids[:, 1:], bias=bias, temperature=..., **ppo_loss)``;
    - ``generate(...)``: the model's own ``generate`` (FSDP2 registers it as a forward method, so the head and
      the embedding are gathered for the whole decoding loop).

    Packed rows: pass ``position_ids`` (restarting in each sequence) and ``labels[B, T]`` (the next token of every
    position); log-probs and per-token loss inputs are then ``[B, T]``, one per position.

    The model's children are registered as this module's own children (the model itself is kept unregistered),
    so parameter names, state dicts, DCP checkpoints and optimizer state keys are exactly the model's: a
    checkpoint does not depend on whether it was written through this module. Tied embeddings stay one
    parameter. Models with parameters or buffers of their own outside any submodule are refused.
    """

    _fsdp_forward_methods = ("generate",)

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        own = [name for name, _ in model.named_parameters(recurse=False)]
        own += [name for name, _ in model.named_buffers(recurse=False)]
        if own:
            raise NotImplementedError(
                f"FusedLinearLM: {type(model).__name__} holds tensors outside its submodules ({own}); "
                "expected a causal LM made of a decoder body and an LM head"
            )
        for name, child in model.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "lm", model)  # not a submodule: its children are ours, under the same names
        self.training = model.training

    def train(self, mode: bool = True):
        super().train(mode)
        self.lm.training = mode  # the children are shared; the model object's own flag follows too
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                temperature: float = 1.0, return_entropy: bool = False, ppo_loss: Optional[dict] = None,
                position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        if ppo_loss is None:
            return sequence_logprobs(self.lm, input_ids, attention_mask, temperature=temperature,
                                     return_entropy=return_entropy, position_ids=position_ids, labels=labels)
        hidden, weight, bias = head_operands(*hidden_and_lm_head(self.lm, input_ids, attention_mask, position_ids))
        hidden, labels = _next_token(hidden, input_ids, labels)
        return ops.fused_linear_ppo_loss(hidden, weight, labels, bias=bias, temperature=temperature, **ppo_loss)

    def generate(self, *args, **kwargs):
        return self.lm.generate(*args, **kwargs)


class CausalLMWithValueHead(FusedLinearLM):
    """A causal LM and a scalar value head on its last hidden states (after the final norm), as one module.

    The PPO critic of ``PPOConfig(critic="value_head")``: the head shares the policy's body, like TRL's
    ``AutoModelForCausalLMWithValueHead``. One forward gives the policy's log-probs (or its PPO loss) and the
    values, so DDP all-reduces the head's gradient with the body's and FSDP2 shards it with the root:

    - ``forward(input_ids, attention_mask, temperature=...)``: ``(logp[B, T-1], values[B, T])``;
    - ``forward(..., ppo_loss={old_logp, advantages, mask, ...})``: ``(loss, stats, values[B, T])``, the loss by
      ``ops.fused_linear_ppo_loss`` on the hidden states when ``from_hidden``, else by ``ops.fused_ppo_loss`` on
      the model's own logits;
    - ``generate(...)``: the model's ``generate`` (the head is not used).

    ``values[:, t]`` is the head's output at position ``t`` (float32). As in ``FusedLinearLM`` the model's
    children are this module's children under the model's names; the head is the one extra child,
    ``value_head``: ``nn.Linear(hidden, 1)``, normal weights with std ``1 / (hidden + 1)`` (OpenRLHF's critic
    init) drawn from ``generator``, bias 0. Checkpoints write it beside the model's ``save_pretrained`` folder as
    ``value_head.safetensors`` (keys ``weight`` and ``bias``, so
    ``nn.Linear(hidden, 1).load_state_dict(safetensors.torch.load_file(path))`` loads it).
    """

    saved_beside = ("value_head",)  # child modules the checkpoint writes as {name}.safetensors next to the model

    def __init__(self, model: torch.nn.Module, *, from_hidden: bool = False,
                 generator: Optional[torch.Generator] = None):
        super().__init__(model)
        weight = model.get_output_embeddings().weight
        hidden = weight.shape[1]
        head = torch.nn.Linear(hidden, 1, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():  # a dedicated generator: the same head on every rank, the global RNG untouched
            head.weight.copy_(torch.randn(1, hidden, generator=generator) / (hidden + 1))
            head.bias.zero_()
        self.value_head = head
        self.from_hidden = from_hidden

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[-1] != self.value_head.in_features:
            raise NotImplementedError(f"value head: the model's last hidden states have width {hidden.shape[-1]}, "
                                      f"expected {self.value_head.in_features} (the LM head's input width)")
        # a fresh [B, T] tensor, not a view of the [B, T, 1] output (FSDP2 hooks its backward on the outputs)
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float().clone()

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                temperature: float = 1.0, ppo_loss: Optional[dict] = None,
                position_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        if self.from_hidden:
            hidden, weight, bias = hidden_and_lm_head(self.lm, input_ids, attention_mask, position_ids)
            values = self._values(hidden)
            hidden, weight, bias = head_operands(hidden, weight, bias)
            hidden, labels = _next_token(hidden, input_ids, labels)
            if ppo_loss is not None:
                loss, stats = ops.fused_linear_ppo_loss(hidden, weight, labels, bias=bias,
                                                        temperature=temperature, **ppo_loss)
                return loss, stats, values
            return ops.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature), values
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, use_cache=False)
        values = self._values(out.hidden_states[-1])  # the last hidden states, after the final norm
        logits, labels = _next_token(out.logits, input_ids, labels)
        if ppo_loss is not None:
            loss, stats = ops.fused_ppo_loss(logits, labels, temperature=temperature, **ppo_loss)
            return loss, stats, values
        return ops.selective_log_softmax(logits, labels, temperature=temperature), values
