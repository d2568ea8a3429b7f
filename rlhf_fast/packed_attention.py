"""Attention over packed rows, registered with ``transformers``' attention interface.

A packed micro-batch is one row ``input_ids[1, N]`` holding several sequences back to back, with
``position_ids`` that restart at 0 (and step by 1) inside each sequence. Each sequence must attend only to its own
earlier tokens. ``transformers``' own ``sdpa`` / ``eager`` paths would build a dense ``[N, N]`` block-diagonal mask
for that (quadratic in the micro-batch budget, not in the sequence length); this module instead registers an
attention function, ``"rlhf_fast_varlen"``, that

- on a packed row (no 2-D attention mask, as many keys as queries) finds the sequences from ``position_ids`` and
  runs causal attention on each sequence alone: flash-attn's varlen kernel on CUDA when ``flash_attn`` is
  installed (fp16 / bf16), otherwise one ``scaled_dot_product_attention`` per sequence, so the cost is
  ``sum(L_i^2)``, never ``N^2``;
- everywhere else (a padded batch with its attention mask, decoding with a KV cache) hands the call to the
  model's previous implementation (``sdpa`` by default), with that implementation's own mask.

So a model switched to it by ``enable_packed_attention`` still generates and runs padded batches exactly as before.
The mask function registered beside it returns no mask for packed rows, so no ``[N, N]`` tensor is ever built.
"""
from __future__ import annotations

import weakref

import torch

NAME = "rlhf_fast_varlen"
_DEFAULT_INNER = "sdpa"
_inner: dict[int, str] = {}  # id(config) -> the implementation it had before (padded and cached calls go there)
_bounds_cache: list = [None, None, None, {}]  # (position_ids, its version, bounds, group plans): once per forward


def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


# ---------------------------------------------------------------------------------------------- model support


def _model_configs(model):
    """The configs of ``model`` and of every ``transformers`` sub-model inside it (each once)."""
    from transformers import PreTrainedModel

    seen, out = set(), []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and id(module.config) not in seen:
            seen.add(id(module.config))
            out.append((module, module.config))
    return out


def packing_unsupported_reason(model) -> str | None:
    """Why ``model``'s attention cannot run on packed rows, or None when it can.

    Packable: every ``transformers`` sub-model uses the functional attention interface (``AttentionInterface``;
    most decoder LMs of transformers 5) with causal self-attention, and has no attention logit soft-capping, no
    attention sinks and no non-attention layers (state-space / linear-attention layers carry state across the
    whole row). Models built outside ``transformers`` are not packable.
    """
    found = _model_configs(model)
    if not found:
        return f"{type(model).__name__} is not a transformers model (no PreTrainedModel inside)"
    for module, config in found:
        name = type(module).__name__
        if not getattr(module, "_supports_attention_backend", False) and not _uses_interface(module):
            return f"{name} does not run its attention through transformers' AttentionInterface"
        if getattr(config, "is_encoder_decoder", False):
            return f"{name} is an encoder-decoder model"
        if not getattr(config, "is_causal", True):
            return f"{name} uses bidirectional attention"
        for attr in ("attn_logit_softcapping",):
            if getattr(config, attr, None) not in (None, 0, 0.0):
                return f"{name} soft-caps its attention logits (config.{attr} = {getattr(config, attr)!r})"
        layer_types = getattr(config, "layer_types", None) or []
        other = sorted({t for t in layer_types if t not in ("full_attention", "sliding_attention")})
        if other:
            return f"{name} has layers that are not attention ({', '.join(other)}): their state crosses sequences"
        if any(getattr(m, "sinks", None) is not None for m in module.modules() if m is not module):
            return f"{name} uses attention sinks"
    return None


def _uses_interface(module) -> bool:
    can = getattr(module, "_can_set_attn_implementation", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - a model that cannot even answer cannot be packed
        return False


def enable_packed_attention(model) -> None:
    """Switch ``model`` (and its ``transformers`` sub-models) to ``"rlhf_fast_varlen"``; idempotent.

    Raises ``NotImplementedError`` naming the reason when the model's attention cannot be packed. Padded batches
    and generation keep using the previous implementation (recorded per config)."""
    reason = packing_unsupported_reason(model)
    if reason is not None:
        raise NotImplementedError(f"padding_free: {type(model).__name__} cannot run on packed rows: {reason}. "
                                  "Set padding_free: false (padded batches) for this model")
    register()
    for _, config in _model_configs(model):
        current = config._attn_implementation
        if current != NAME:
            _inner[id(config)] = current or _DEFAULT_INNER
            weakref.finalize(config, _inner.pop, id(config), None)
            config._attn_implementation = NAME


def is_packed_attention_enabled(model) -> bool:
    found = _model_configs(model)
    return bool(found) and all(config._attn_implementation == NAME for _, config in found)


def _inner_name(config) -> str:
    name = _inner.get(id(config), _DEFAULT_INNER) if config is not None else _DEFAULT_INNER
    return _DEFAULT_INNER if name in (None, NAME) else name


# ------------------------------------------------------------------------------------------- registration


def register() -> None:
    """Register ``"rlhf_fast_varlen"`` with ``transformers``' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    if NAME in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        return
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, varlen_mask)


def _packed_call(attention_mask, q_length: int, kv_length: int) -> bool:
    return attention_mask is None and q_length == kv_length and q_length > 1


def varlen_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
                config=None, **kwargs):
    """No mask for packed rows (the attention finds the sequences itself); the previous implementation's mask
    for everything else."""
    offset = q_offset if not isinstance(q_offset, torch.Tensor) else None
    if _packed_call(attention_mask, q_length, kv_length) and offset == 0 and kv_offset == 0:
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    inner = ALL_MASK_ATTENTION_FUNCTIONS[_inner_name(config)]
    return inner(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                 kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, config=config,
                 **kwargs)


def sequence_bounds(position_ids: torch.Tensor, rows: int, length: int) -> list[list[tuple[int, int]]]:
    """``[(start, end), ...]`` of the sequences in each row: a sequence starts where ``position_ids`` does not
    continue the previous token's position by one (transformers' own packed-row rule)."""
    cached, version, bounds = _bounds_cache[:3]
    if cached is position_ids and version == position_ids._version:
        return bounds
    ids = position_ids.reshape(-1, position_ids.shape[-1])
    if ids.shape[-1] != length or ids.shape[0] not in (1, rows):
        raise ValueError(f"position_ids: expected shape [{rows}, {length}] (the packed row), got "
                         f"{tuple(position_ids.shape)}")
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1] + 1
    bounds = []
    for row in starts.cpu():
        cuts = row.nonzero().flatten().tolist() + [length]
        bounds.append(list(zip(cuts[:-1], cuts[1:])))
    if len(bounds) == 1 and rows > 1:
        bounds = bounds * rows
    _bounds_cache[:] = [position_ids, position_ids._version, bounds, {}]
    return bounds


def length_groups(lengths: list[int], slack: float = 0.5) -> list[list[int]]:
    """Sequences (indices into ``lengths``) in groups that one padded attention call serves: longest first, a
    sequence joins the open group while ``size * longest^2 <= (1 + slack) * sum(L^2)`` (padding adds at most
    ``slack`` to the group's attention work), so many short sequences of similar length take one call and a long
    one takes its own."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups, current, squares = [], [], 0
    for i in order:
        square = lengths[i] ** 2
        if current and (len(current) + 1) * lengths[current[0]] ** 2 <= (1 + slack) * (squares + square):
            current.append(i)
            squares += square
            continue
        if current:
            groups.append(current)
        current, squares = [i], square
    if current:
        groups.append(current)
    return groups


def _group_plan(bounds_row: list[tuple[int, int]], device, sliding_window):
    """Per group of one row: token index ``[g, Lg]`` into the row, the key mask (None: plain causal), and the
    inverse order that puts the groups' tokens back in row order. Cached for the forward (all layers share it)."""
    cache = _bounds_cache[3] if len(_bounds_cache) > 3 else {}
    key = (tuple(bounds_row), str(device), sliding_window)
    if key in cache:
        return cache[key]
    lengths = [end - start for start, end in bounds_row]
    plan, order = [], []
    for group in length_groups(lengths):
        width = lengths[group[0]]
        columns = torch.arange(width)
        starts = torch.tensor([bounds_row[i][0] for i in group])
        sizes = torch.tensor([lengths[i] for i in group])
        valid = columns[None, :] < sizes[:, None]
        index = torch.where(valid, starts[:, None] + columns[None, :], starts[:, None])
        mask = None
        uneven = bool((sizes != width).any())
        windowed = sliding_window is not None and width > sliding_window
        if uneven or windowed:
            allowed = columns[None, :] <= columns[:, None]  # causal
            if windowed:
                allowed = allowed & (columns[None, :] > columns[:, None] - sliding_window)
            mask = (allowed[None, :, :] & valid[:, None, :]).unsqueeze(1).to(device)  # [g, 1, Lg, Lg]
        plan.append((index.to(device), valid.flatten().to(device), mask))
        order.append(index[valid])
    inverse = torch.empty(sum(lengths), dtype=torch.long)
    inverse[torch.cat(order)] = torch.arange(sum(lengths))
    cache[key] = (plan, inverse.to(device))
    return cache[key]


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                             sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """``transformers`` attention function (``query[b, h, q, d]``, ``key`` / ``value[b, h_kv, k, d]``; returns
    ``(out[b, q, h, d], None)``): per-sequence causal attention on packed rows, the previous implementation else."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not (causal and _packed_call(attention_mask, query.shape[2], key.shape[2])):
        inner = ALL_ATTENTION_FUNCTIONS[_inner_name(getattr(module, "config", None))]
        extra = {k: val for k, val in dict(sliding_window=sliding_window, softcap=softcap,
                                              is_causal=is_causal).items() if val is not None}
        return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs)
    if softcap is not None or kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"{type(module).__name__}: packed attention supports neither soft-capping, "
                                  "attention sinks nor position biases; use padded batches for this model")
    position_ids = kwargs.get("position_ids")
    rows, length = query.shape[0], query.shape[2]
    if position_ids is None:
        bounds = [[(0, length)]] * rows  # no positions: each row is one sequence (plain causal attention)
    else:
        bounds = sequence_bounds(position_ids, rows, length)
    flash = _flash_varlen() if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) else None
    if flash is not None:
        return _flash_attention(flash, query, key, value, bounds, dropout, scaling, sliding_window), None
    return _per_sequence_attention(module, query, key, value, bounds, dropout, scaling, sliding_window), None


def _flash_attention(flash, query, key, value, bounds, dropout, scaling, sliding_window):
    rows, heads, length, _ = query.shape
    cuts = [0]
    for row_index, row in enumerate(bounds):
        cuts += [row_index * length + end for _, end in row]
    cu_seqlens = torch.tensor(cuts, dtype=torch.int32, device=query.device)
    max_len = max(end - start for row in bounds for start, end in row)

    def flat(t):  # [b, h, n, d] -> [b * n, h, d]
        return t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[3])

    window = (-1, -1) if sliding_window is None else (sliding_window - 1, sliding_window - 1)
    out = flash(flat(query), flat(key), flat(value), cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=dropout,
                softmax_scale=scaling, causal=True, window_size=window)
    return out.reshape(rows, length, heads, -1)


def _per_sequence_attention(module, query, key, value, bounds, dropout, scaling, sliding_window):
    """Causal attention of each sequence on its own: sequences of similar length share one SDPA call, padded to
    the group's longest (a key mask keeps them apart and causal); no work across sequences."""
    from torch.nn.functional import scaled_dot_product_attention

    groups = query.shape[1] // key.shape[1]
    outputs = []
    for row_index, row in enumerate(bounds):
        plan, inverse = _group_plan(row, query.device, sliding_window)
        q_row, k_row, v_row = query[row_index], key[row_index], value[row_index]  # [h, n, d]
        pieces = []
        for index, valid, mask in plan:
            size, width = index.shape

            def gather(t):  # [h, n, d] -> [g, h, Lg, d]
                return t[:, index.flatten()].reshape(t.shape[0], size, width, t.shape[-1]).transpose(0, 1)

            q, k, v = gather(q_row), gather(k_row), gather(v_row)
            if groups > 1:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                               scale=scaling)  # [g, h, Lg, d]
            pieces.append(out.transpose(0, 1).reshape(out.shape[1], size * width, -1)[:, valid])
        outputs.append(torch.cat(pieces, dim=1)[:, inverse] if len(pieces) > 1 else pieces[0][:, inverse])
    out = torch.stack(outputs) if len(outputs) > 1 else outputs[0].unsqueeze(0)  # [b, h, n, d]
    return out.transpose(1, 2).contiguous()
