"""Atomic checkpoints: ``save_pretrained`` weights (safetensors) + optimizer, scheduler, RNG and step state.

Layout of ``{output_dir}/checkpoint-{step}/``: one ``save_pretrained`` folder per model (``model/``,
``value_model/``), ``trainer_state.pt`` (optimizer, scheduler, RNG states, step and trainer extras) and
``trainer_state.json`` (the human-readable part). Everything is written into a temporary sibling directory
first and renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"


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


def save_checkpoint(path: str, *, models: dict, tokenizer, optimizer, scheduler, step: int,
                    extra: dict[str, Any] | None = None) -> str:
    """Write the checkpoint directory ``path`` atomically; returns ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    for name, model in models.items():
        model.save_pretrained(os.path.join(temporary, name), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(temporary, "model"))
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state(),
         "step": step, "extra": extra or {}},
        os.path.join(temporary, STATE_FILE),
    )
    with open(os.path.join(temporary, "trainer_state.json"), "w", encoding="utf-8") as handle:
        json.dump({"step": step, **{k: v for k, v in (extra or {}).items() if _is_json(v)}}, handle, indent=2)
    if os.path.exists(path):  # os.replace cannot overwrite a non-empty directory: move the old one aside first
        stale = f"{temporary}.old"
        os.replace(path, stale)
        os.replace(temporary, path)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(temporary, path)
    return path


def load_checkpoint(path: str, *, models: dict, optimizer, scheduler) -> dict[str, Any]:
    """Load weights into ``models`` in place and restore optimizer, scheduler and RNG; returns the state dict."""
    state_file = os.path.join(path, STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"resume_from: {path} is not a checkpoint (no {STATE_FILE})")
    for name, model in models.items():
        folder = os.path.join(path, name)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"resume_from: {path} has no {name}/ folder")
        # from_pretrained resolves tied and renamed weights the way save_pretrained wrote them
        loaded = type(model).from_pretrained(folder, dtype=next(model.parameters()).dtype)
        model.load_state_dict(loaded.state_dict())
        del loaded
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def _is_json(value) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True
