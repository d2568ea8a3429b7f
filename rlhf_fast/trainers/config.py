"""Dataclass configs of the SFT, reward-model and PPO trainers.

Field names follow TRL / ``transformers.TrainingArguments`` where a name exists there, so that a TRL config
ports by changing the import. Every field is documented in docs/trainers.md.
"""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .._validation import check_option, did_you_mean
from ..reference.losses import AGG_MODES
from ..rollout.engine import ENGINES

# transformers.get_scheduler names that need nothing but warmup and the step count (the others need
# lr_scheduler_kwargs or a metric at every step)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
REPORTERS = ("jsonl", "tensorboard")  # metric sinks; report_to: none (or []) writes none
NONFINITE_POLICIES = ("error", "skip")


@dataclass
class TrainingConfig:
    """What every trainer shares: optimisation, schedule, logging and checkpoints."""

    output_dir: str = "rlhf_fast_out"
    seed: int = 0
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "linear"  # any name transformers.get_scheduler takes
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # wins over warmup_ratio when > 0
    max_grad_norm: Optional[float] = 1.0
    num_train_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_train_epochs
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_length: int = 512  # SFT: cut from the right; RM: prompt cut from the left first; PPO prompts: left, BOS kept
    logging_steps: int = 1
    save_steps: int = 0  # 0: save only at the end
    save_final: bool = True
    resume_from: Optional[str] = None  # a checkpoint directory written by save_checkpoint
    bf16: bool = True  # autocast to bfloat16, only ever on CUDA
    report_to: list = field(default_factory=lambda: ["jsonl", "tensorboard"])
    plot: bool = True  # PNG plots of the logged metrics at the end (needs matplotlib)
    disable_tqdm: bool = False
    device: Optional[str] = None  # default: cuda (this rank's LOCAL_RANK) when available, else cpu
    distributed: str = "auto"  # auto (ddp when torchrun starts > 1 process) | none | ddp | fsdp2; docs/distributed.md
    on_nonfinite: str = "error"  # a NaN / inf loss or gradient norm: "error" stops the run, "skip" skips the step
    # packed micro-batches (one row, no padding): auto (where every model's attention can be packed) | true | false
    padding_free: Union[str, bool] = "auto"
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward

    def __post_init__(self) -> None:
        _coerce_types(self)  # YAML reads 1e-5 as the string '1e-5': coerce, or refuse naming the field
        _check_ranges(self, {
            "seed": "[0, 9223372036854775807]", "learning_rate": "(0, inf)", "weight_decay": "[0, inf)",
            "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)", "adam_epsilon": "(0, inf)", "warmup_ratio": "[0, 1]",
            "warmup_steps": "[0, inf)", "max_grad_norm": "(0, inf)", "num_train_epochs": "[0, inf)",
            "per_device_train_batch_size": "[1, inf)", "per_device_eval_batch_size": "[1, inf)",
            "gradient_accumulation_steps": "[1, inf)", "max_length": "[1, inf)", "logging_steps": "[1, inf)",
            "save_steps": "[0, inf)",
        })
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        check_option("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        check_option("distributed", self.distributed, ("auto", "none", "ddp", "fsdp2"))
        check_option("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        self.report_to = _check_report_to(self.report_to)
        _check_output_dir(self.output_dir)
        if self.resume_from is not None and self.resume_from != "latest" and not os.path.isdir(self.resume_from):
            raise ValueError(f"resume_from: no checkpoint directory at {self.resume_from!r} (expected a "
                             "checkpoint-N directory, 'latest' or null)")
        _check_device(self.device)
        self.padding_free = _padding_free(self.padding_free)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> "TrainingConfig":
        """Build from a plain dict (a YAML file), refusing unknown keys with a did-you-mean hint."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise ValueError(f"{source}: unknown {cls.__name__} key {key!r}{did_you_mean(key, names)}; "
                                 f"valid keys: {', '.join(sorted(names))}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class SFTConfig(TrainingConfig):
    """Causal-LM fine-tuning on ``{prompt, completion}``; the loss counts completion tokens only."""

    learning_rate: float = 2e-5
    completion_only_loss: bool = True


@dataclass
class RewardConfig(TrainingConfig):
    """Bradley-Terry reward model on ``{prompt, chosen, rejected}`` (optional ``margin`` field per pair)."""

    learning_rate: float = 1e-5
    center_rewards_coefficient: Optional[float] = None  # adds coef * mean((r_c + r_r)^2) (Eisenstein et al.)
    eval_steps: int = 0  # 0: evaluate at the end only (with an eval_dataset); > 0: also every eval_steps steps
    disable_dropout: bool = True  # dropout off in the reward model (p = 0 in every dropout module and config field)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ranges(self, {"center_rewards_coefficient": "[0, inf)", "eval_steps": "[0, inf)"})


DPO_LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo")  # rlhf_fast.reference.dpo has the formulas


@dataclass
class DPOConfig(TrainingConfig):
    """Direct preference optimisation on ``{prompt, chosen, rejected}`` (TRL's ``DPOConfig`` names)."""

    learning_rate: float = 1e-6
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | robust | hinge | ipo | simpo (reference-free, length-normalised)
    label_smoothing: float = 0.0  # cDPO / rDPO smoothing, in [0, 0.5); sigmoid, robust and simpo only
    simpo_gamma: float = 0.5  # SimPO's target margin (TRL's CPOConfig name)
    reference_free: bool = False  # no reference: log-ratios against a uniform reference (0)
    precompute_ref_log_probs: bool = False  # reference log-probs of every pair once, before training
    max_tokens_per_micro_batch: int = 4096  # token budget of each forward pass (chosen + rejected tokens)
    logprobs_from_hidden: bool = True  # linear_logprobs on hidden states: never builds the [N, V] logits
    eval_steps: int = 0  # 0: evaluate at the end only (with an eval_dataset); > 0: also every eval_steps steps
    disable_dropout: bool = True  # the policy and the reference must be the same function up to the update

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ranges(self, {"beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "simpo_gamma": "(-inf, inf)",
                             "max_tokens_per_micro_batch": "[1, inf)", "eval_steps": "[0, inf)"})
        check_option("loss_type", self.loss_type, DPO_LOSS_TYPES)
        if self.label_smoothing and self.loss_type in ("hinge", "ipo"):
            raise ValueError(f"label_smoothing: loss_type={self.loss_type!r} takes no label smoothing, got "
                             f"{self.label_smoothing}; use 0 or loss_type sigmoid / robust / simpo")
        if self.precompute_ref_log_probs and self.uses_reference is False:
            raise ValueError("precompute_ref_log_probs: there is no reference to precompute with reference_free "
                             f"or loss_type='simpo' (got reference_free={self.reference_free}, "
                             f"loss_type={self.loss_type!r})")

    @property
    def uses_reference(self) -> bool:
        return not self.reference_free and self.loss_type != "simpo"


ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
SCALE_REWARDS = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
CRITICS = ("separate", "value_head")
KL_PENALTY_MODES = ("reward", "loss")


@dataclass
class PPOConfig(TrainingConfig):
    """PPO (or GRPO / RLOO) on ``{prompt}`` with a reward model or a Python reward function.

    One PPO step = generate ``per_device_train_batch_size * num_generations`` responses, score them, then
    ``num_ppo_epochs`` passes over them in ``num_mini_batches`` optimizer steps each.
    """

    learning_rate: float = 1e-6
    max_steps: int = 100  # PPO steps (rollout + update); <= 0: num_train_epochs passes over the prompts
    # generation
    response_length: int = 53  # max new tokens
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    stop_token: Optional[str] = "eos"  # stop at the tokenizer's EOS; None: always generate response_length
    missing_eos_penalty: Optional[float] = None  # subtracted from the score of responses that never stop
    num_generations: int = 1  # samples per prompt (>= 2 for grpo / rloo)
    # rewards: one weight per reward model / function of reward_model (a list), default 1 each (rewards.py)
    reward_weights: Optional[list] = None
    # rollout engine (docs/rollout.md): "hf" (model.generate) or "vllm" (a vLLM engine in this process)
    rollout_engine: str = "hf"
    vllm_importance_sampling_correction: bool = True  # vllm: truncated importance weights in the policy loss
    vllm_importance_sampling_cap: float = 3.0  # vllm: the weights' upper bound
    vllm_gpu_memory_utilization: float = 0.3  # vllm on CUDA: the fraction of the GPU its weights and KV cache take
    vllm_enable_sleep_mode: bool = False  # vllm on CUDA: free the engine's memory during the update
    # advantages and KL
    advantage_estimator: str = "gae"
    critic: str = "separate"  # gae: "separate" critic model (value_model), or "value_head" on the policy's body
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    scale_rewards: str = "group"  # grpo: divide by the group's std, the batch's, or "none" (Dr. GRPO)
    whiten_rewards: bool = False
    kl_coef: float = 0.05
    kl_penalty: str = "reward"  # "reward": k1 penalty in the per-token reward; "loss": kl_estimator in the loss
    kl_estimator: str = "k3"  # for kl_penalty="loss"
    target_kl: Optional[float] = None  # adaptive KL controller (Ziegler et al.) when set
    kl_horizon: int = 10000
    # update
    num_ppo_epochs: int = 4
    num_mini_batches: int = 1
    cliprange: float = 0.2
    cliprange_high: Optional[float] = None
    dual_clip: Optional[float] = None
    cliprange_value: Optional[float] = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    loss_scale_factor: Optional[float] = None  # seq-mean-token-sum-norm's constant divisor; None: response_length
    importance_sampling_level: str = "token"  # "sequence": GSPO's length-normalised sequence ratio
    # DAPO (Yu et al. 2025)
    mask_truncated_completions: bool = False  # responses without the stop token get no loss
    overlong_buffer_len: int = 0  # > 0: soft overlong punishment over the last overlong_buffer_len tokens
    overlong_penalty_factor: float = 1.0
    dynamic_sampling: bool = False  # drop groups of equal rewards, sample more prompts to fill the batch
    dynamic_sampling_max_rounds: int = 3  # extra sampling rounds at most per step
    # memory / speed
    max_tokens_per_micro_batch: int = 4096  # token budget of each forward pass (rollout scoring and training)
    logprobs_from_hidden: bool = False  # fused_linear_ppo_loss on hidden states: never builds the logits
    eval_steps: int = 0  # > 0: evaluate every eval_steps PPO steps; with an eval_dataset always at the end too
    # dropout off (p = 0) in the policy, reference, critic and reward model, as TRL: the ratio of new to old
    # log-probs and the KL must compare the same function, not two dropout masks
    disable_dropout: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_ranges(self, {
            "response_length": "[1, inf)", "temperature": "(0, inf)", "top_p": "(0, 1]", "top_k": "[0, inf)",
            "missing_eos_penalty": "(-inf, inf)", "num_generations": "[1, inf)", "gamma": "[0, 1]", "lam": "[0, 1]",
            "kl_coef": "[0, inf)", "target_kl": "(0, inf)", "kl_horizon": "[1, inf)", "num_ppo_epochs": "[1, inf)",
            "num_mini_batches": "[1, inf)", "cliprange": "[0, 1]", "cliprange_high": "[0, inf)",
            "dual_clip": "(1, inf)", "cliprange_value": "(0, inf)", "vf_coef": "[0, inf)",
            "entropy_coef": "(-inf, inf)", "max_tokens_per_micro_batch": "[1, inf)", "eval_steps": "[0, inf)",
            "vllm_importance_sampling_cap": "(0, inf)", "vllm_gpu_memory_utilization": "(0, 1]",
        })
        check_option("advantage_estimator", self.advantage_estimator, ADVANTAGE_ESTIMATORS)
        check_option("kl_penalty", self.kl_penalty, KL_PENALTY_MODES)
        check_option("critic", self.critic, CRITICS)
        check_option("stop_token", self.stop_token, ("eos", None))
        check_option("loss_agg", self.loss_agg, AGG_MODES)
        check_option("rollout_engine", self.rollout_engine, ENGINES)
        if self.critic == "value_head" and self.advantage_estimator != "gae":
            raise ValueError(f"critic='value_head' needs advantage_estimator='gae' (got "
                             f"{self.advantage_estimator!r}, which uses no critic); drop critic or use 'gae'")
        check_option("kl_estimator", self.kl_estimator, ("k1", "k2", "k3"))
        if self.advantage_estimator in ("grpo", "rloo") and self.num_generations < 2:
            raise ValueError(f"advantage_estimator={self.advantage_estimator!r} needs num_generations >= 2, "
                             f"got {self.num_generations}")
        if (self.top_p < 1.0 or self.top_k > 0) and (self.logprobs_from_hidden or self.critic == "value_head"):
            raise ValueError("top_p / top_k: the log-probs of a truncated sampling distribution need the logits, "
                             "which logprobs_from_hidden: true and critic: value_head never build; use top_p: 1.0 "
                             "and top_k: 0 with them")
        if (self.top_p < 1.0 or self.top_k > 0) and self.rollout_engine == "vllm":
            raise ValueError(f"top_p / top_k: with rollout_engine: vllm the engine's log-probs (the importance "
                             f"weights) are not those of the truncated sampling distribution the trainer uses; use "
                             f"top_p: 1.0 and top_k: 0 with rollout_engine: vllm, or rollout_engine: hf (got top_p: "
                             f"{self.top_p}, top_k: {self.top_k})")
        check_option("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_option("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _check_ranges(self, {"loss_scale_factor": "(0, inf)", "overlong_buffer_len": "[0, inf)",
                             "overlong_penalty_factor": "[0, inf)", "dynamic_sampling_max_rounds": "[0, inf)"})
        if self.mask_truncated_completions and self.stop_token is None:
            raise ValueError("mask_truncated_completions: needs a stop token (stop_token: eos); with stop_token: "
                             "null every response is truncated and nothing would be trained")
        if self.overlong_buffer_len > self.response_length:
            raise ValueError(f"overlong_buffer_len: expected a value in [0, response_length={self.response_length}], "
                             f"got {self.overlong_buffer_len}")
        if self.dynamic_sampling and self.advantage_estimator not in ("grpo", "rloo"):
            raise ValueError(f"dynamic_sampling: needs groups of samples (advantage_estimator 'grpo' or 'rloo'), got "
                             f"{self.advantage_estimator!r}")
        if self.reward_weights is not None:
            self.reward_weights = [_coerce(f"reward_weights[{i}]", float, w) for i, w in enumerate(self.reward_weights)]
            bad = [(i, w) for i, w in enumerate(self.reward_weights) if not math.isfinite(w)]
            if bad:
                raise ValueError(f"reward_weights[{bad[0][0]}]: expected a finite number, got {bad[0][1]}")
        self.check_mini_batches(int(os.environ.get("WORLD_SIZE", "1")))

    def check_mini_batches(self, world_size: int) -> None:
        """Minibatches split the rollout batch of all ranks together (torchrun sets WORLD_SIZE)."""
        batch = self.per_device_train_batch_size * self.num_generations * world_size
        if batch % self.num_mini_batches:
            ranks = f" * world_size ({world_size})" if world_size > 1 else ""
            raise ValueError(f"num_mini_batches={self.num_mini_batches} must divide the rollout batch "
                             f"per_device_train_batch_size * num_generations{ranks} = {batch}")


def _coerce_types(config) -> None:
    """Check every field against its annotation, converting what is unambiguous.

    Config files come through PyYAML, which reads ``1e-5`` (no dot) as a string and ``3`` as an int: float fields
    accept ints and numeric strings, int fields accept integral floats and integer strings, string fields accept
    ``os.PathLike``, list fields accept a single string. Anything else raises ``ValueError`` naming the field, the
    expected type and the value.
    """
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        expected = hints.get(item.name, Any)
        value = getattr(config, item.name)
        setattr(config, item.name, _coerce(item.name, expected, value))


def _coerce(name: str, expected, value):
    optional = False
    if typing.get_origin(expected) is typing.Union:
        arguments = [a for a in typing.get_args(expected) if a is not type(None)]
        optional = len(arguments) < len(typing.get_args(expected))
        expected = arguments[0] if len(arguments) == 1 else Any
    if value is None and optional:
        return None
    base = typing.get_origin(expected) or expected

    def refuse():
        label = base.__name__ if isinstance(base, type) else str(base)
        label = f"{label} or null" if optional else label
        raise ValueError(f"{name}: expected {_article(label)} {label}, got {value!r} ({type(value).__name__})")

    if base is Any:
        return value
    if base is bool:
        if isinstance(value, bool):
            return value
        refuse()
    if base is float:
        if isinstance(value, bool):
            refuse()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                refuse()
        refuse()
    if base is int:
        if isinstance(value, bool):
            refuse()
        if isinstance(value, int):
            return value
        number = value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value.strip())
                except ValueError:
                    refuse()
        if isinstance(number, float) and math.isfinite(number) and number == int(number):
            return int(number)
        refuse()
    if base is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        refuse()
    if base is list:
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)):
            return list(value)
        refuse()
    return value


def _padding_free(value):
    """``"auto"``, True or False (YAML's true / false, or those words as strings)."""
    words = {"auto": "auto", "true": True, "false": False}
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    raise ValueError(f"padding_free: expected auto, true or false, got {value!r} ({type(value).__name__})")


def _article(label: str) -> str:
    return "an" if label[:1] in "aeiou" else "a"


_RANGE_HINTS = {"max_grad_norm": " (null turns clipping off)", "save_steps": " (0: save only at the end)"}


def _check_ranges(config, ranges: dict[str, str]) -> None:
    """Each field in its interval, written as in maths: ``"(0, inf)"``, ``"[0, 1)"``. NaN is in none, and an
    infinity only where a bound says ``inf]``. ``None`` passes (type checking has refused it where not Optional)."""
    for name, interval in ranges.items():
        value = getattr(config, name)
        if value is not None and not _in_interval(value, interval):
            raise ValueError(f"{name}: expected a value in {interval}, got {value!r}{_RANGE_HINTS.get(name, '')}")


def _in_interval(value, interval: str) -> bool:
    low, high = (_number(bound) for bound in interval[1:-1].split(","))
    above = value > low if interval[0] == "(" else value >= low
    below = value < high if interval[-1] == ")" else value <= high
    return above and below


def _number(text: str):
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        return float(text)


def _check_report_to(report_to: list) -> list:
    """Known sinks only; ``none`` alone (or ``[]``) for none. Others (wandb, mlflow, ...) are refused by name
    rather than silently ignored."""
    if report_to == ["none"]:
        return []
    for sink in report_to:
        if sink not in REPORTERS:
            raise ValueError(f"report_to: {sink!r} is not supported{did_you_mean(sink, REPORTERS)}; supported: "
                             f"{list(REPORTERS)}, or 'none' (metrics.jsonl and trainer.logger.history hold every "
                             "logged value)")
    return report_to


def _check_output_dir(output_dir: str) -> None:
    """``output_dir`` exists as a directory, or can be created: its nearest existing ancestor is a writable
    directory. Nothing is created here."""
    if not output_dir:
        raise ValueError("output_dir: expected a directory path, got ''")
    target = os.path.abspath(output_dir)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing == target and not os.path.isdir(target):
        raise ValueError(f"output_dir: {output_dir!r} exists and is not a directory")
    if not os.path.isdir(existing):
        raise ValueError(f"output_dir: cannot create {output_dir!r}: {existing!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output_dir: cannot create or write {output_dir!r}: no write permission in {existing!r}")


def _check_device(device: Optional[str]) -> None:
    """A device string torch parses, of a kind these trainers run on, present on this machine."""
    if device is None:
        return
    import torch

    expected = "expected 'cpu', 'cuda', 'cuda:N', 'mps' or null (cuda when available, else cpu)"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: {expected}, got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r}, but CUDA is not available on this machine; use 'cpu' or null")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device: {device!r}, but MPS is not available on this machine; use 'cpu' or null")
    elif parsed.type != "cpu":
        raise ValueError(f"device: {expected}, got {device!r}")
