"""What the three trainers share: device, seeding, AdamW + schedule, autocast, logging and checkpoints."""
from __future__ import annotations

import contextlib
import os
import random
import re
import warnings
from typing import Iterable

import numpy as np
import torch

from . import checkpoint_dirs, distributed, guards
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainingConfig
from .errors import NonFiniteError, OutputDirBusy
from .locking import OutputDirLock
from .metrics import MetricsLogger, format_metric, plot_metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class BaseTrainer:
    """Subclasses register each trained model with ``self.train_module`` and implement ``train``.

    ``self.models`` maps names to the Hugging Face models (what ``save_pretrained`` writes), ``self.wrapped``
    the same names to the modules the trainer calls (DDP / FSDP2 wrappers under ``torchrun``). ``self.dist``
    says where this process stands; in one process every collective is a no-op.

    ``kind`` names the trainer in its checkpoints: resuming a checkpoint of another kind is refused.
    """

    kind = "base"

    def __init__(self, args: TrainingConfig, processing_class):
        if not isinstance(args, TrainingConfig):
            raise TypeError(f"args: expected a {TrainingConfig.__name__} subclass, got {type(args).__name__}")
        if processing_class is None:
            raise ValueError("processing_class: a tokenizer is required")
        self.args = args
        self.tokenizer = processing_class
        self.dist = distributed.setup(args.distributed, device=args.device, bf16=args.bf16)
        self.device = self.dist.device
        self.global_step = 0
        self.nonfinite_skips = 0  # optimizer steps skipped for a NaN / inf loss or gradient norm (on_nonfinite: skip)
        self.models: dict[str, torch.nn.Module] = {}
        self.wrapped: dict[str, torch.nn.Module] = {}
        seed_everything(args.seed + self.dist.rank)  # ranks sample different rollouts; rank 0 = one process
        self.lock = self._lock_output_dir()
        # the checkpoint to resume, verified; None for a fresh start (also resume_from: latest with none yet)
        self.resume_path = (checkpoint_dirs.resolve_resume(args.resume_from, args.output_dir, self.dist, self.kind)
                            if args.resume_from else None)
        # rank 0 writes metrics; the others keep the history in memory only
        # a fresh run starts a new metrics.jsonl; a resumed one keeps the records up to its checkpoint (maybe_resume)
        self.logger = MetricsLogger(args.output_dir, report_to=args.report_to if self.dist.is_main else (),
                                    fresh=not self.resume_path)

    def _lock_output_dir(self) -> OutputDirLock | None:
        """Rank 0 locks ``output_dir`` (every rank raises if another run holds it), then removes what killed runs
        left there."""
        lock, refusal = None, None
        if self.dist.is_main:
            lock = OutputDirLock(self.args.output_dir)
            try:
                lock.acquire()
                checkpoint_dirs.clean_stale(self.args.output_dir)
            except OutputDirBusy as error:
                refusal = str(error)
        refusal = self.dist.broadcast_object(refusal)
        if refusal:
            raise OutputDirBusy(refusal)
        return lock

    def train_module(self, name: str, model: torch.nn.Module, runner: torch.nn.Module | None = None):
        """Wrap ``runner`` (default: ``model``; a module whose forward uses all of ``model``) for this world,
        register ``model`` under ``name`` for checkpoints, and return the wrapped runner."""
        if self.args.gradient_checkpointing:
            from .packed import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        wrapped = self.dist.wrap(runner if runner is not None else model)
        self.models[name], self.wrapped[name] = model, wrapped
        return wrapped

    def use_packing(self, **models) -> bool:
        """Whether forward passes run packed micro-batches (``padding_free``; see ``packed.choose_packing``)."""
        from .packed import choose_packing

        return choose_packing(self.args.padding_free, models)

    # ---- optimisation -------------------------------------------------------------------------------------
    def create_optimizer_and_scheduler(self, parameters: Iterable[torch.nn.Parameter], num_training_steps: int):
        from transformers import get_scheduler

        args = self.args
        decay, no_decay = [], []
        for p in parameters:
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)  # no weight decay on norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        )
        warmup = args.warmup_steps if args.warmup_steps > 0 else int(round(args.warmup_ratio * num_training_steps))
        self.scheduler = get_scheduler(args.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                       num_training_steps=max(1, num_training_steps))
        self.num_training_steps = num_training_steps

    def optimizer_step(self, parameters: list[torch.nn.Parameter], loss=None) -> torch.Tensor:
        """Clip, check, step, schedule, zero; returns the pre-clip (global) gradient norm as a 0-d tensor.

        ``loss``: the step's loss (the same on every rank). A NaN or infinite loss or gradient norm (one host read
        per step) stops the run with ``NonFiniteError`` before the weights change, or with ``on_nonfinite: skip``
        skips the update (the schedule still advances; the skip is warned about and counted in
        ``nonfinite_skips``)."""
        norm = self.dist.clip_grad_norm(parameters, self.args.max_grad_norm)
        problem = guards.nonfinite_step(norm, loss)
        if problem is None:
            self.optimizer.step()
        elif self.args.on_nonfinite == "skip":
            self.nonfinite_skips += 1
            warnings.warn(f"step {self.global_step + 1}: {problem}; the update is skipped "
                          f"({self.nonfinite_skips} skipped so far, on_nonfinite: skip)", stacklevel=2)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteError(f"step {self.global_step + 1}: {problem}; stopped before the update (the weights "
                                 "are those of the previous step). Lower learning_rate or max_grad_norm, check the "
                                 "data and rewards, or set on_nonfinite: skip to skip such steps")
        with warnings.catch_warnings():  # a skipped first step: torch warns that the schedule runs ahead
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def autocast(self):
        """bf16 autocast on CUDA when ``args.bf16``; a no-op on CPU (CPU bf16 matmuls are slow and lossy)."""
        if self.device.type == "cuda" and self.args.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @staticmethod
    def show(bar, **values) -> None:
        """Progress-bar postfix; NaN and infinities print as such."""
        bar.set_postfix({key: format_metric(value) for key, value in values.items()})

    def progress(self, total: int, initial: int, description: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=description,
                    disable=self.args.disable_tqdm or not self.dist.is_main,
                    dynamic_ncols=True, leave=False)

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint_extra(self) -> dict:
        """Trainer-specific state to checkpoint beside optimizer / scheduler / RNG (subclasses extend)."""
        return {"history": list(self.logger.history), "nonfinite_skips": self.nonfinite_skips}

    def restore_extra(self, extra: dict) -> None:
        # metrics.jsonl (rank 0) is rewritten with the checkpoint's records: the resumed steps are not logged twice
        self.logger.restart(self.global_step, extra.get("history"))
        self.nonfinite_skips = int(extra.get("nonfinite_skips", 0))

    def save_checkpoint(self, path: str | None = None, *, versioned: bool = False) -> str:
        """``checkpoint-{step}`` (or ``path``) with its manifest; ``versioned``: a link to a versioned copy."""
        path = path or os.path.join(self.args.output_dir, f"checkpoint-{self.global_step}")
        self._ensure_lock()
        return save_checkpoint(path, dist=self.dist, models=self.models, wrapped=self.wrapped,
                               tokenizer=self.tokenizer, optimizer=self.optimizer, scheduler=self.scheduler,
                               step=self.global_step, extra=self.checkpoint_extra(), kind=self.kind,
                               versioned=versioned)

    def _ensure_lock(self) -> None:
        if self.lock is not None:
            self.lock.ensure()

    def maybe_resume(self) -> None:
        if not self.resume_path:
            return
        state = load_checkpoint(self.resume_path, dist=self.dist, wrapped=self.wrapped,
                                optimizer=self.optimizer, scheduler=self.scheduler)
        self.global_step = int(state["step"])
        self.restore_extra(state["extra"])

    def maybe_save(self) -> None:
        if self.args.save_steps and self.global_step % self.args.save_steps == 0:
            self.save_checkpoint()

    def finish(self, name: str) -> None:
        """Final save (``{output_dir}/final``), plots, and closing the metric sinks."""
        if self.args.save_final:
            self.save_checkpoint(os.path.join(self.args.output_dir, "final"), versioned=True)
        if self.args.plot and self.dist.is_main:
            plot_metrics(self.logger.history, os.path.join(self.args.output_dir, f"{name}_metrics.png"), title=name)
        self.logger.close()
        self.release()

    def release(self) -> None:
        """Let another run use ``output_dir`` (``finish`` calls it; a later write by this trainer locks again)."""
        if self.lock is not None:
            self.lock.release()

    def log(self, metrics: dict) -> dict:
        if self.nonfinite_skips:
            metrics = {**metrics, "nonfinite_skips": self.nonfinite_skips}
        self._ensure_lock()
        return self.logger.log(metrics, self.global_step)


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters())
    return parameter.device, parameter.dtype
