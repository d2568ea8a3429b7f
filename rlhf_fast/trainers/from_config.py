"""Build a trainer from a YAML file: what ``rlhf-fast sft | rm | ppo | dpo --config FILE.yaml`` runs.

The file is one flat mapping: the path keys below plus any field of the stage's config dataclass::

    model: ./my-sft-model          # a local save_pretrained directory (all stages)
    tokenizer: ./my-sft-model      # optional, default: model
    train_file: data/train.jsonl   # JSONL in the stage's schema (see rlhf_fast/trainers/data.py)
    eval_file: data/eval.jsonl     # optional
    reward_model: ./my-rm          # ppo: a sequence-classification model with one label, and / or
    reward_funcs: ["rlhf_fast.rewards:answer_match", "my_rewards.py:format_ok"]   # ppo: reward functions
    ref_model: ./my-sft-model      # ppo / dpo, optional (ppo default: model; dpo default: a copy of model)
    value_model: ./my-rm           # ppo only, optional, default: reward_model (gae with critic: separate only)
    learning_rate: 1.0e-6          # ...any SFTConfig / RewardConfig / PPOConfig field

Relative paths (also ``output_dir`` and ``resume_from``) are relative to the YAML file. A key given twice is
refused (YAML itself would keep the last value silently).
"""
from __future__ import annotations

import collections.abc
import os
from typing import Any

from .._validation import did_you_mean
from .config import DPOConfig, PPOConfig, RewardConfig, SFTConfig
from .data import load_jsonl

STAGES = {"sft": SFTConfig, "rm": RewardConfig, "ppo": PPOConfig, "dpo": DPOConfig}
PATH_KEYS = {
    "sft": ("model", "tokenizer", "train_file", "eval_file"),
    "rm": ("model", "tokenizer", "train_file", "eval_file"),
    "ppo": ("model", "tokenizer", "train_file", "eval_file", "reward_model", "ref_model", "value_model"),
    "dpo": ("model", "tokenizer", "train_file", "eval_file", "ref_model"),
}
REQUIRED = {"sft": ("model", "train_file"), "rm": ("model", "train_file"), "ppo": ("model", "train_file"),
            "dpo": ("model", "train_file")}


def read_config(stage: str, path: str) -> tuple[dict[str, str], Any]:
    """``(paths, config)`` from the YAML file ``path``; errors name the file and the key."""
    import yaml

    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {list(STAGES)}, got {stage!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.load(handle, Loader=_strict_loader()) or {}
        except _DuplicateKey as error:
            raise ValueError(f"{path}:{error}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML ({' '.join(str(error).split())})") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of keys to values, got {type(raw).__name__}")
    config_cls = STAGES[stage]
    field_names = set(config_cls.__dataclass_fields__)
    known = set(PATH_KEYS[stage]) | field_names | ({"reward_funcs"} if stage == "ppo" else set())
    for key in raw:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r} for `rlhf-fast {stage}`{did_you_mean(key, sorted(known))}")
    for key in REQUIRED[stage]:
        if not raw.get(key):
            raise ValueError(f"{path}: missing required key {key!r} for `rlhf-fast {stage}`")
    base = os.path.dirname(os.path.abspath(path))
    if stage == "ppo" and not raw.get("reward_model") and not raw.get("reward_funcs"):
        raise ValueError(f"{path}: missing required key 'reward_model' or 'reward_funcs' for `rlhf-fast ppo`")
    paths = {k: _resolve(base, raw[k]) for k in PATH_KEYS[stage] if raw.get(k)}
    for key, value in paths.items():
        exists = os.path.isfile(value) if key.endswith("_file") else os.path.isdir(value)
        if not exists:
            raise FileNotFoundError(f"{path}: {key} not found: {value}")
    settings = {k: v for k, v in raw.items() if k in field_names}
    for key in ("output_dir", "resume_from"):
        if settings.get(key) and settings[key] != "latest":
            settings[key] = _resolve(base, settings[key])
    try:
        config = config_cls(**settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from None
    if stage == "ppo":
        paths["reward_funcs"] = _reward_functions(path, base, raw.get("reward_funcs"))
        count = len(paths["reward_funcs"]) + ("reward_model" in paths)
        if config.reward_weights is not None and len(config.reward_weights) != count:
            raise ValueError(f"{path}: reward_weights: expected {count} weights (reward_model first, then "
                             f"reward_funcs in order), got {len(config.reward_weights)}")
    if "value_model" in paths and getattr(config, "critic", "separate") == "value_head":
        raise ValueError(f"{path}: value_model cannot be used with critic: value_head (the critic is a head on "
                         "the policy); remove value_model, or set critic: separate")
    return paths, config


class _DuplicateKey(ValueError):
    pass


def _strict_loader():
    """PyYAML's SafeLoader, refusing a mapping key given twice (naming both lines)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, collections.abc.Hashable) and key in seen:
                    raise _DuplicateKey(f"{line}: duplicate key {key!r} (first given on line {seen[key]}); "
                                        "give each key once")
                seen[key] = line
            return super().construct_mapping(node, deep)

    return StrictLoader


def _reward_functions(path: str, base: str, specs) -> list:
    """The callables named by ``reward_funcs`` (``module:function`` or ``file.py:function``, files relative to
    the YAML file), loaded now so that a typo fails before any model loads."""
    from .rewards import load_reward_function

    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ValueError(f"{path}: reward_funcs: expected a list of 'module:function' strings, got {specs!r}")
    try:
        return [load_reward_function(spec, base) for spec in specs]
    except (ValueError, FileNotFoundError) as error:
        raise ValueError(f"{path}: {error}") from None


def _resolve(base: str, value) -> str:
    """Relative paths are relative to the config file, so a config travels with its data and outputs."""
    value = os.path.expanduser(str(value))
    return value if os.path.isabs(value) else os.path.join(base, value)


def build_trainer(stage: str, config_path: str):
    """Load models, tokenizer and data named by the config file and return the ready trainer."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from .dpo import DPOTrainer
    from .ppo import PPOTrainer
    from .reward import RewardTrainer
    from .sft import SFTTrainer

    paths, config = read_config(stage, config_path)
    kind = {"sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "rm"}[stage]
    train = load_jsonl(paths["train_file"], kind)
    evaluation = load_jsonl(paths["eval_file"], kind) if "eval_file" in paths else None
    tokenizer = AutoTokenizer.from_pretrained(paths.get("tokenizer", paths["model"]))

    def scalar_model(folder):
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    if stage == "sft":
        model = AutoModelForCausalLM.from_pretrained(paths["model"])
        return SFTTrainer(model=model, args=config, train_dataset=train, eval_dataset=evaluation,
                          processing_class=tokenizer)
    if stage == "rm":
        return RewardTrainer(model=scalar_model(paths["model"]), args=config, train_dataset=train,
                             eval_dataset=evaluation, processing_class=tokenizer)
    if stage == "dpo":
        ref = AutoModelForCausalLM.from_pretrained(paths["ref_model"]) if "ref_model" in paths else None
        return DPOTrainer(AutoModelForCausalLM.from_pretrained(paths["model"]), ref, args=config, train_dataset=train,
                          eval_dataset=evaluation, processing_class=tokenizer)
    policy = AutoModelForCausalLM.from_pretrained(paths["model"])
    ref = AutoModelForCausalLM.from_pretrained(paths.get("ref_model", paths["model"]))
    rewards = ([scalar_model(paths["reward_model"])] if "reward_model" in paths else []) + paths["reward_funcs"]
    value = None
    if config.advantage_estimator == "gae" and config.critic == "separate" and (
            "value_model" in paths or "reward_model" in paths):
        value = scalar_model(paths.get("value_model", paths.get("reward_model")))
    reward = rewards[0] if len(rewards) == 1 else rewards
    return PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                      value_model=value, train_dataset=train, eval_dataset=evaluation)
