"""Triton kernels, one file per op family, each with its autograd.Function.

Every family module exports ``KERNELS``: op name -> implementation with the reference's signature (the layouts
``rlhf_fast.ops`` hands over: ``[N, V]`` logits, ``[R, T]`` per-token tensors). ``rlhf_fast._dispatch`` falls back
to the reference for names no module provides. This package is imported only when the Triton backend is chosen,
so importing rlhf_fast never needs triton.
"""
from __future__ import annotations

import importlib
import importlib.util

# Families in the order they are looked up; a module that is not written yet is simply absent.
FAMILIES = ("logprobs", "fused_loss", "kl", "advantages", "losses", "linear", "dpo")


def _load() -> dict:
    table = {}
    for family in FAMILIES:
        name = f"{__name__}.{family}"
        if importlib.util.find_spec(name) is None:
            continue
        table.update(importlib.import_module(name).KERNELS)
    return table


KERNELS = _load()
