"""LoRA / PEFT through the ``peft`` library: wrapping a model, the adapter-disabled reference, sizes.

With an adapter the reference policy is the base model itself: the same module run with its adapters switched
off (``PeftModel.disable_adapter()``), so no second copy of the weights is held. ``pip install "rlhf_fast[peft]"``.
"""
from __future__ import annotations

import contextlib
import resource
import sys

import torch

from .distributed import unwrap


def require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("peft_config: LoRA / PEFT needs the `peft` library; pip install \"rlhf_fast[peft]\"") from None
    return peft


def is_peft_model(model) -> bool:
    if "peft" not in sys.modules:  # nothing can be a PeftModel before peft is imported
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def apply_peft(model: torch.nn.Module, peft_config, seed: int, name: str = "model") -> torch.nn.Module:
    """``model`` with fresh adapters from ``peft_config`` (a ``peft.PeftConfig``); ``None`` gives ``model`` back.
    Only the adapter (and ``modules_to_save``) parameters require grad. The adapters' random initialisation is
    drawn from ``seed`` alone (the global RNG is left as it was): every rank must start from the same adapters,
    and FSDP2, unlike DDP, does not broadcast rank 0's parameters."""
    if peft_config is None:
        return model
    peft = require_peft()
    if not isinstance(peft_config, peft.PeftConfig):
        raise TypeError(f"peft_config: expected a peft.PeftConfig (e.g. peft.LoraConfig), got "
                        f"{type(peft_config).__name__}")
    if is_peft_model(model):
        raise ValueError(f"peft_config: {name} already carries adapters (a PeftModel); pass peft_config=None to "
                         "train them, or pass the base model")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return peft.get_peft_model(model, peft_config)


def peft_model_in(module: torch.nn.Module):
    """The ``PeftModel`` that ``module`` (a DDP / FSDP2 wrapper, a ``FusedLinearLM``) runs, or ``None``."""
    inner = unwrap(module)
    inner = getattr(inner, "lm", inner)  # FusedLinearLM keeps the model as .lm
    return inner if is_peft_model(inner) else None


def adapter_disabled(module: torch.nn.Module):
    """A context in which ``module`` computes the base model's outputs (its adapters off)."""
    model = peft_model_in(module)
    if model is None:
        raise ValueError("adapter_disabled: the module holds no PEFT adapters")
    return model.disable_adapter()


def parameter_counts(*modules) -> dict[str, int]:
    """``trainable_params`` and ``total_params`` of the modules (shared tensors counted once)."""
    seen, trainable, total = set(), 0, 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return {"trainable_params": trainable, "total_params": total}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on ``device`` (MiB), or on CPU the process's peak resident set (MiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def null_context():
    return contextlib.nullcontext()
