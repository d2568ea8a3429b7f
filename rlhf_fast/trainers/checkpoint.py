"""Atomic checkpoints: ``save_pretrained`` weights for users, ``torch.distributed.checkpoint`` state for resuming.

Layout of ``{output_dir}/checkpoint-{step}/``:
- ``model/``, ``value_model/``: full weights written by ``save_pretrained`` (safetensors) on rank 0, the
  tokenizer beside the policy; what the next stage or ``from_pretrained`` loads. Under FSDP2 the shards are
  gathered to rank 0's CPU first (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``). Heads that
  the trainer's module adds around the model (its ``saved_beside``: the PPO value head) are written next to the
  model's files as ``{name}.safetensors`` and kept out of the model's own weights.
- ``distcp/``: the trained models and the optimizer as a DCP checkpoint (``get_state_dict`` then
  ``torch.distributed.checkpoint.save``; every rank writes its own shards). DCP re-shards on load, so a run
  written by N ranks with DDP or FSDP2 resumes on M ranks with any strategy, one process included.
- ``trainer_state.pt`` (scheduler, rank 0's RNG states, step, trainer extras), ``rng_state_{rank}.pt`` for the
  other ranks, and ``trainer_state.json`` (the human-readable part).
- ``manifest.json``, written last: the size and SHA-256 of every other file, the trainer kind and the step
  (``manifest.py``); ``resume_from`` verifies it before loading (``checkpoint_dirs.resolve_resume``).
Everything goes into a temporary sibling directory that rank 0 renames into place once every rank is done, so
a crash never leaves a half-written checkpoint under the final name (``checkpoint_dirs.publish``: ``final`` is
a link switched atomically between versioned copies). With several nodes ``output_dir`` must be on a file
system that all of them see.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import warnings
from typing import Any

import numpy as np
import torch

from . import checkpoint_dirs, manifest
from .distributed import Distributed, unwrap
from .errors import CheckpointError

STATE_FILE = "trainer_state.pt"
DCP_DIR = "distcp"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, *, dist: Distributed, models: dict, wrapped: dict, tokenizer, optimizer, scheduler,
                    step: int, extra: dict[str, Any] | None = None, kind: str = "unknown",
                    versioned: bool = False) -> str:
    """Write the checkpoint directory ``path`` atomically (a collective: every rank calls it); returns ``path``.

    ``models``: name -> the Hugging Face model (for ``save_pretrained``); ``wrapped``: name -> the module the
    trainer runs (the model itself, a DDP / FSDP2 wrapper, or a scalar-head wrapper of it). ``kind``: the
    trainer's name, recorded so that another trainer refuses the checkpoint; ``versioned``: publish ``path`` as
    a link to a versioned copy (``final``).
    """
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    parent = os.path.dirname(os.path.abspath(path))
    temporary = dist.broadcast_object(os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}"))
    if dist.is_main:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
        os.makedirs(temporary)
    dist.barrier()
    container = torch.nn.ModuleDict(wrapped)
    model_state, optimizer_state = get_state_dict(container, optimizer)
    with _single_process_quiet():
        dcp_save({"model": model_state, "optimizer": optimizer_state},
                 checkpoint_id=os.path.join(temporary, DCP_DIR), no_dist=not torch.distributed.is_initialized())
    for name, model in models.items():
        _save_pretrained(dist, model, wrapped[name], os.path.join(temporary, name))
    if not dist.is_main:
        torch.save(rng_state(), os.path.join(temporary, f"rng_state_{dist.rank}.pt"))
    dist.barrier()
    if dist.is_main:
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(temporary, "model"))
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step, "extra": extra or {},
                    "world_size": dist.world_size, "strategy": dist.strategy, "trainer": kind},
                   os.path.join(temporary, STATE_FILE))
        with open(os.path.join(temporary, "trainer_state.json"), "w", encoding="utf-8") as handle:
            json.dump({"step": step, "trainer": kind, "world_size": dist.world_size, "strategy": dist.strategy,
                       **{k: v for k, v in (extra or {}).items() if _is_json(v)}}, handle, indent=2)
    dist.barrier()
    manifest.write_manifest(temporary, dist, {"trainer": kind, "step": step})  # last: the checkpoint is complete
    if dist.is_main:
        checkpoint_dirs.publish(temporary, path, versioned=versioned)
    dist.barrier()  # nobody reads or overwrites the checkpoint before it has its final name
    return path


def _save_pretrained(dist: Distributed, model, wrapped, folder: str) -> None:
    beside = tuple(getattr(unwrap(wrapped), "saved_beside", ()))  # e.g. ("value_head",)
    if dist.strategy != "fsdp2":  # replicated: rank 0's copy is the whole model
        if dist.is_main:
            model.save_pretrained(folder, safe_serialization=True)
            for name in beside:
                _save_beside(folder, name, getattr(unwrap(wrapped), name).state_dict())
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.is_main:
        for name in beside:  # the extra heads go to their own files, not into the model's weights
            _save_beside(folder, name, {k[len(name) + 1:]: v for k, v in full.items() if k.startswith(f"{name}.")})
            full = {k: v for k, v in full.items() if not k.startswith(f"{name}.")}
        # the model's place in the wrapped module (a scalar-head wrapper's ``model.``); a FusedLinearLM holds
        # the model's children under the model's own names, so nothing to strip there
        if getattr(wrapped, "lm", None) is model:
            prefix = ""
        else:
            prefix = next(name for name, m in wrapped.named_modules() if m is model)
        prefix = f"{prefix}." if prefix else ""
        state = {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)


def _save_beside(folder: str, name: str, state: dict) -> None:
    """``{folder}/{name}.safetensors`` with the head's own keys (``weight``, ``bias``)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()},
              os.path.join(folder, f"{name}.safetensors"))


def load_checkpoint(path: str, *, dist: Distributed, wrapped: dict, optimizer, scheduler) -> dict[str, Any]:
    """Restore models, optimizer, scheduler and RNG in place from ``path``; returns the trainer state.

    Works for any number of ranks and any strategy: DCP re-shards the saved state to the current layout.
    """
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise CheckpointError(f"resume_from: {path} is not a checkpoint (no {STATE_FILE})")
    if not os.path.isdir(os.path.join(path, DCP_DIR)):
        raise CheckpointError(f"resume_from: {path} has no {DCP_DIR}/ folder (model and optimizer state)")
    try:
        return _load(path, state_file, dist=dist, wrapped=wrapped, optimizer=optimizer, scheduler=scheduler)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign checkpoint that no manifest vouched for
        message = " ".join(str(error).split())[:500]
        raise CheckpointError(f"resume_from: cannot load {path}: {type(error).__name__}: {message}") from error


def _load(path: str, state_file: str, *, dist: Distributed, wrapped: dict, optimizer, scheduler) -> dict[str, Any]:
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    state = _torch_load(state_file)  # first: the small file, before anything changes in place
    rank_file = os.path.join(path, f"rng_state_{dist.rank}.pt")
    rank_rng = _torch_load(rank_file) if not dist.is_main and os.path.isfile(rank_file) else None
    container = torch.nn.ModuleDict(wrapped)
    model_state, optimizer_state = get_state_dict(container, optimizer)  # the current layout, filled in place
    saved = {"model": model_state, "optimizer": optimizer_state}
    with _single_process_quiet():
        dcp_load(saved, checkpoint_id=os.path.join(path, DCP_DIR), no_dist=not torch.distributed.is_initialized())
    set_state_dict(container, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if dist.is_main:
        set_rng_state(state["rng"])
    elif rank_rng is not None:
        set_rng_state(rank_rng)
    # a rank the writing run did not have keeps its fresh (seed + rank) generator: only its samples differ
    return state


def _torch_load(file: str):
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - name the file: torch's own message does not
        raise ValueError(f"{file}: {type(error).__name__}: {error}") from error


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every save / load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
