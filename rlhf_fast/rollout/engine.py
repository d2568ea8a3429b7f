"""The rollout-engine interface: what samples the responses of a PPO / GRPO / RLOO step.

An engine takes prompt token ids and the trainer's sampling settings and returns a ``Generation``: the
response ids, whether each stopped on the stop token and, where the engine reports them, its per-token
log-probs of the sampled tokens. Before each rollout the trainer hands it the policy (``sync_weights``); around
the update it may release its memory (``sleep`` / ``wake_up``). ``make_engine`` builds one by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .generation import Generation

ENGINES = ("hf", "vllm")


@dataclass(frozen=True)
class SamplingSettings:
    """The trainer's sampling settings, applied exactly; nothing comes from the model's generation defaults."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    eos_id: Optional[int] = None  # the stop token; None: always max_new_tokens tokens
    do_sample: bool = True  # False: greedy


class RolloutEngine:
    """Base class; ``generate`` is the one method every engine implements."""

    name = "base"
    reports_logprobs = False  # whether Generation.logprobs is filled

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> "Generation":
        raise NotImplementedError

    def sync_weights(self, model: torch.nn.Module, version: int) -> bool:
        """Make the engine sample from ``model``'s current weights; ``version`` counts the trainer's updates, so
        an unchanged version pushes nothing. Returns whether weights were pushed."""
        return False

    def sleep(self) -> None:
        """Release what memory the engine can while the trainer updates (no-op where unsupported)."""

    def wake_up(self) -> None:
        """Re-acquire what ``sleep`` released."""

    def close(self) -> None:
        """Stop the engine's processes and free its memory."""


def make_engine(name: str, *, model: torch.nn.Module, pad_id: int, generator: torch.nn.Module | None = None,
                synced_gpus: bool = False, **options) -> RolloutEngine:
    """``hf``: ``generator.generate`` (the module the trainer samples with, default ``model``); ``vllm``: a vLLM
    engine with ``model``'s config and weights (``options``: see ``VLLMEngine``)."""
    if name == "hf":
        from .hf import HFEngine

        return HFEngine(generator if generator is not None else model, pad_id=pad_id, synced_gpus=synced_gpus)
    if name == "vllm":
        from .vllm_engine import VLLMEngine

        return VLLMEngine(model, **options)
    raise ValueError(f"rollout_engine: expected one of {list(ENGINES)}, got {name!r}")
