"""Thin SFT, reward-model and PPO trainers for Hugging Face ``transformers`` models (see docs/trainers.md)."""
from .config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, TrainingConfig
from .data import load_jsonl
from .dpo import DPOTrainer
from .ppo import PPOTrainer
from .reward import RewardTrainer
from .sft import SFTTrainer

__all__ = ["DPOConfig", "DPOTrainer", "PPOConfig", "PPOTrainer", "RewardConfig", "RewardTrainer", "SFTConfig", "SFTTrainer",
           "TrainingConfig", "load_jsonl"]
