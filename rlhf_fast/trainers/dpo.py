"""Direct preference optimisation (Rafailov et al., 2023) on ``{prompt, chosen, rejected}``.

The loss is ``rlhf_fast.ops.dpo_loss`` (every ``loss_type``) on per-token log-probs that come, by default, from
the hidden states through ``ops.linear_logprobs`` (never a ``[tokens, vocab]`` logits tensor). Each forward pass
holds the chosen and the rejected completions of whole pairs, grouped by the batcher into passes of at most
``max_tokens_per_micro_batch`` tokens (one plan over all ranks, the same number of passes on each). The reference
is a frozen copy of the policy, the policy's own base model with its LoRA adapters off (``peft_config``), log-probs
computed once before training (``precompute_ref_log_probs``), or nothing (``reference_free`` / ``simpo``).
"""
from __future__ import annotations

import copy
import math
import time
import warnings

import torch

from .. import batching, ops
from .base import BaseTrainer
from .config import DPOConfig
from .data import check_dataset, pad_token_id
from .packed import MicroBatch, token_logprobs
from .peft_support import adapter_disabled, apply_peft, parameter_counts, peak_memory_mb, peft_model_in
from .reward import encode_pair

STAT_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


class DPOTrainer(BaseTrainer):
    """``DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=[{"prompt", "chosen", "rejected"}],
    eval_dataset=..., processing_class=tok, peft_config=None).train()`` (TRL's keywords and positional order).

    ``ref_model=None``: a frozen copy of ``model``; with ``peft_config`` (or a ``PeftModel``) the base model
    with the adapters disabled; unused with ``reference_free`` or ``loss_type="simpo"``.
    """

    kind = "dpo"

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None):
        super().__init__(args or DPOConfig(), processing_class)
        args = self.args
        if not isinstance(args, DPOConfig):
            raise TypeError(f"args: expected a DPOConfig, got {type(args).__name__}")
        if data_collator is not None:
            raise ValueError("data_collator: not supported (pairs are tokenised and batched by the trainer); pass None")
        if model is None:
            raise ValueError("model: a causal LM policy is required")
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model: the policy itself cannot be its frozen reference; pass ref_model=None for a "
                             "frozen copy (or the adapter-disabled base model with peft_config)")
        model = apply_peft(model, peft_config, self.args.seed)
        self.uses_adapter_reference = ref_model is None and peft_model_in(model) is not None and args.uses_reference
        if not args.uses_reference:
            ref_model = None
        elif ref_model is None and not self.uses_adapter_reference:
            ref_model = copy.deepcopy(model)  # before wrapping: FSDP2 shards modules in place
        if args.disable_dropout:
            from ..modeling import disable_dropout

            for module in (model, ref_model):
                if module is not None:
                    disable_dropout(module)
        self.model = model
        self.packed = self.use_packing(model=model, ref_model=ref_model)  # before wrapping: sets packed attention
        self.policy_train = self.train_module("model", model, self._runner(model))
        self.ref_runner = None
        if ref_model is not None:
            self.ref_runner = self.dist.wrap(self._runner(ref_model.eval().requires_grad_(False)), trainable=False)
        self.pad_id = pad_token_id(self.tokenizer)
        self.train_pairs = self._encode_all(train_dataset, "train_dataset")
        self.eval_pairs = self._encode_all(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.global_batch_size = args.per_device_train_batch_size * self.dist.world_size
        self.batches_per_epoch = math.ceil(len(self.train_pairs) / self.global_batch_size)
        if args.max_steps > 0:
            total = args.max_steps
        else:
            total = math.ceil(args.num_train_epochs * self.batches_per_epoch / args.gradient_accumulation_steps)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.sizes = parameter_counts(self.model, ref_model)
        self.create_optimizer_and_scheduler(self.trainable, total)
        self.ref_sums = None  # per pair: the reference's summed log-probs of (chosen, rejected)
        if args.precompute_ref_log_probs:
            self.ref_sums = self._precompute_reference(self.train_pairs)
            self.eval_ref_sums = self._precompute_reference(self.eval_pairs) if self.eval_pairs else None
            self.ref_runner = None  # no longer needed: a frozen copy is freed here
        self.maybe_resume()

    # ---- data ---------------------------------------------------------------------------------------------
    def _runner(self, model):
        if not self.args.logprobs_from_hidden:
            return model
        from ..modeling import FusedLinearLM

        return FusedLinearLM(model)  # body + head inside one forward: what DDP / FSDP2 wrap

    def _encode_all(self, dataset, name: str):
        """``(prompt_len, chosen ids, rejected ids)`` per pair (the reward trainer's truncation); pairs whose
        chosen and rejected tokens are identical are dropped with one warning."""
        pairs = []
        for record in check_dataset(dataset, "rm", name):
            chosen, rejected, _, prompt_len = encode_pair(self.tokenizer, record, self.args.max_length)
            pairs.append((prompt_len, chosen, rejected))
        kept = [p for p in pairs if p[1] != p[2]]
        if len(kept) < len(pairs):
            message = (f"{name}: {len(pairs) - len(kept)} of {len(pairs)} pairs have identical chosen and rejected "
                       f"tokens within max_length={self.args.max_length}; they are dropped")
            if not kept:
                raise ValueError(message + " (none left)")
            warnings.warn(message, stacklevel=3)
        return kept

    def _global_micro_batch(self, index: int) -> list[int]:
        """Pair indices of the ``index``-th global micro-batch: a function of (seed, index), as in the other trainers."""
        size = self.global_batch_size
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.train_pairs), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        return order[position * size:(position + 1) * size].tolist()

    def _passes(self, pairs: list) -> list[list[int]]:
        """This rank's forward passes over ``pairs`` (indices into it): the batcher's plan of the pairs' chosen +
        rejected tokens across all ranks, the same number of passes on every rank (empty ones included)."""
        lengths = [len(p[1]) + len(p[2]) for p in pairs]
        budget = self.args.max_tokens_per_micro_batch
        if max(lengths, default=0) > budget:
            raise ValueError(f"max_tokens_per_micro_batch: a pair has {max(lengths)} chosen + rejected tokens, more "
                             f"than the budget of {budget}; raise max_tokens_per_micro_batch or lower max_length")
        plan = batching.plan_micro_batches(lengths, budget, num_ranks=self.dist.world_size)
        return [list(mb) for mb in plan[self.dist.rank]]

    def _collate(self, pairs) -> tuple[MicroBatch, torch.Tensor]:
        """One forward pass over the chosen rows then the rejected rows (packed or padded), and the completion
        masks ``[2n, W]`` of their label positions (position ``t`` predicts token ``t + 1``)."""
        sequences = [p[1] for p in pairs] + [p[2] for p in pairs]
        batch = MicroBatch(sequences, list(range(len(sequences))), packed=self.packed, pad_id=self.pad_id,
                           device=self.device)
        mask = torch.zeros(len(sequences), max(len(s) for s in sequences) - 1, dtype=torch.long)
        for row, (pair, sequence) in enumerate(zip(pairs + pairs, sequences)):
            mask[row, max(0, pair[0] - 1): len(sequence) - 1] = 1  # labels from the first completion token on
        return batch, mask.to(self.device)

    # ---- log-probs ------------------------------------------------------------------------------------------
    def _logprobs(self, runner, batch: MicroBatch, width: int) -> torch.Tensor:
        """``[2n, width]`` per-label log-probs of the pass's rows under ``runner``."""
        per_position = token_logprobs(runner, batch, temperature=1.0, from_hidden=self.args.logprobs_from_hidden)
        return batch.to_rows(per_position, width)

    @torch.no_grad()
    def _reference_logprobs(self, batch: MicroBatch, width: int):
        """The reference's per-token log-probs: the frozen copy, or the policy with its adapters off."""
        if self.uses_adapter_reference:
            with adapter_disabled(self.policy_train), self.autocast():
                return self._logprobs(self.policy_train, batch, width).float()
        with self.autocast():
            return self._logprobs(self.ref_runner, batch, width).float()

    def _precompute_reference(self, pairs) -> torch.Tensor:
        """``[len(pairs), 2]`` summed reference log-probs of the completions, computed once, on all ranks together."""
        sums = torch.zeros(len(pairs), 2, dtype=torch.float32, device=self.device)
        was_training = self.policy_train.training
        self.policy_train.eval()
        for micro in self._passes(pairs):
            batch = [pairs[i] for i in micro] if micro else pairs[:1]  # an empty pass still runs (FSDP2)
            micro_batch, mask = self._collate(batch)
            per_pair = (self._reference_logprobs(micro_batch, mask.shape[1]) * mask).sum(-1).view(2, -1).T
            if micro:
                sums[torch.tensor(micro, device=self.device)] = per_pair
        self.policy_train.train(was_training)
        return self.dist.all_reduce_sum(sums)

    # ---- loss -----------------------------------------------------------------------------------------------
    def compute_loss(self, pairs, num_pairs: float, ref_sums=None):
        """DPO loss of ``pairs`` (one forward pass of the policy, and of the reference unless ``ref_sums``)
        divided by ``num_pairs``; ``stats`` are device tensors divided the same way."""
        batch, mask = self._collate(pairs)
        n, width = len(pairs), mask.shape[1]
        ref_c = ref_r = None
        if self.args.uses_reference:
            if ref_sums is not None:
                ref_c, ref_r = ref_sums[:, 0], ref_sums[:, 1]
            else:
                ref = self._reference_logprobs(batch, width)
                ref_c, ref_r = ref[:n], ref[n:]
        with self.autocast():
            logp = self._logprobs(self.policy_train, batch, width)
        a = self.args
        loss, stats = ops.dpo_loss(logp[:n], logp[n:], mask[:n], mask[n:], ref_chosen_logp=ref_c,
                                   ref_rejected_logp=ref_r, beta=a.beta, loss_type=a.loss_type,
                                   label_smoothing=a.label_smoothing, simpo_gamma=a.simpo_gamma,
                                   reference_free=a.reference_free, num_pairs=num_pairs)
        return loss, stats, mask.sum()

    def train(self) -> list[dict]:
        args = self.args
        self.policy_train.train()
        bar = self.progress(self.num_training_steps, self.global_step, "dpo")
        steps = args.gradient_accumulation_steps
        while self.global_step < self.num_training_steps:
            start = time.perf_counter()
            totals = torch.zeros(1 + len(STAT_KEYS) + 1, device=self.device)  # loss, stats, tokens
            for k in range(steps):
                indices = self._global_micro_batch(self.global_step * steps + k)
                pairs = [self.train_pairs[i] for i in indices]
                passes = self._passes(pairs)
                for j, micro in enumerate(passes):
                    weight = 1.0 if micro else 0.0  # an empty pass keeps this rank in the collectives
                    rows = micro or [0]
                    ref_sums = None
                    if self.ref_sums is not None:
                        ref_sums = self.ref_sums[torch.tensor([indices[i] for i in rows], device=self.device)]
                    sync = k == steps - 1 and j == len(passes) - 1
                    with self.dist.gradient_sync([self.policy_train], sync=sync):
                        # the loss divides by the global micro-batch's pairs and the accumulation steps
                        loss, stats, tokens = self.compute_loss([pairs[i] for i in rows], len(pairs) * steps,
                                                                ref_sums)
                        (loss * (weight * self.dist.grad_scale)).backward()
                    part = torch.stack([loss.detach(), *(stats[key] for key in STAT_KEYS), tokens.float()])
                    totals = totals + part * weight
            totals = self.dist.all_reduce_sum(totals).tolist()  # one host read per optimizer step
            grad_norm = float(self.optimizer_step(self.trainable, loss=totals[0]))
            self.global_step += 1
            metrics = {}
            if self.global_step % args.logging_steps == 0 or self.global_step == self.num_training_steps:
                elapsed = time.perf_counter() - start
                metrics = {"loss": totals[0], **{key: totals[1 + i] for i, key in enumerate(STAT_KEYS)},
                           "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                           "tokens_per_s": totals[-1] / elapsed, "step_time_s": elapsed,
                           "peak_memory_mb": peak_memory_mb(self.device)}
                if self.global_step == 1:
                    metrics.update(self.sizes)
                self.show(bar, loss=totals[0], acc=totals[3])
            if (self.eval_pairs is not None and args.eval_steps and self.global_step % args.eval_steps == 0
                    and self.global_step < self.num_training_steps):
                metrics.update(self.evaluate())
            if metrics:
                self.log(metrics)
            bar.update(1)
            self.maybe_save()
        bar.close()
        if self.eval_pairs is not None:
            self.log(self.evaluate())
        self.finish("dpo")
        return self.logger.history

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out DPO loss and implicit-reward statistics (``eval_`` prefixed), every rank on all pairs."""
        self.policy_train.eval()
        pairs = self.eval_pairs
        totals = torch.zeros(1 + len(STAT_KEYS), device=self.device)
        size = self.args.per_device_eval_batch_size
        for start in range(0, len(pairs), size):
            rows = list(range(start, min(start + size, len(pairs))))
            ref_sums = None
            if self.ref_sums is not None:
                ref_sums = self.eval_ref_sums[torch.tensor(rows, device=self.device)]
            loss, stats, _ = self.compute_loss([pairs[i] for i in rows], len(pairs), ref_sums)
            totals += torch.stack([loss, *(stats[key] for key in STAT_KEYS)])
        self.policy_train.train()
        values = totals.tolist()
        return {"eval_loss": values[0], **{f"eval_{key}": values[1 + i] for i, key in enumerate(STAT_KEYS)}}
