"""The ``hf`` rollout engine: ``model.generate`` on the trainer's own policy (``rollout.generation.generate``)."""
from __future__ import annotations

import torch

from .generation import Generation, generate
from .engine import RolloutEngine, SamplingSettings


class HFEngine(RolloutEngine):
    """Samples with the policy the trainer updates, so it needs no weight push and reports no log-probs of its
    own: its sampling distribution is the trainer's (``old_logp`` is already exact)."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, *, pad_id: int, synced_gpus: bool = False):
        self.model = model
        self.pad_id = pad_id  # left-pads the prompts of a batch
        self.synced_gpus = synced_gpus  # FSDP2: ranks decode in lockstep (parameters are gathered each step)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings) -> Generation:
        return generate(self.model, prompt_ids, pad_id=self.pad_id, eos_id=sampling.eos_id,
                        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                        top_p=sampling.top_p, top_k=sampling.top_k, do_sample=sampling.do_sample,
                        synced_gpus=self.synced_gpus)
