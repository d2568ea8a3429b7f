"""Rollout engines: what samples a PPO / GRPO / RLOO step's responses (``hf`` generate or ``vllm``), and the
truncated importance weights that correct for an engine whose log-probs are not the trainer's."""
from .engine import ENGINES, RolloutEngine, SamplingSettings, make_engine
from .importance import importance_weights, mismatch_metrics, per_token_engine_logp

__all__ = ["ENGINES", "RolloutEngine", "SamplingSettings", "importance_weights", "make_engine", "mismatch_metrics",
           "per_token_engine_logp"]
