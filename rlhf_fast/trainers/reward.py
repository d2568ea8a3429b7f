"""Bradley-Terry reward model on ``{prompt, chosen, rejected}``: ``-logsigmoid(r_chosen - r_rejected - margin)``."""
from __future__ import annotations

import math
import time
import warnings

import torch
import torch.nn.functional as F

from . import guards
from .base import BaseTrainer
from .config import RewardConfig
from .data import check_dataset, encode_completion, encode_prompt, pad_token_id, truncate_left
from .heads import PerTokenScalar
from .packed import MicroBatch
from .peft_support import apply_peft


class RewardTrainer(BaseTrainer):
    """``RewardTrainer(model=AutoModelForSequenceClassification(num_labels=1), args=RewardConfig(...),
    train_dataset=[{"prompt", "chosen", "rejected"}, ...], eval_dataset=..., processing_class=tok,
    peft_config=None).train()``; with a ``peft.PeftConfig`` (``task_type="SEQ_CLS"`` also trains the score head)
    only the adapters train."""

    kind = "reward"

    def __init__(self, model, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):
        super().__init__(args or RewardConfig(), processing_class)
        model = apply_peft(model, peft_config, self.args.seed)
        self.model = model
        if self.args.disable_dropout:  # the same function for chosen and rejected, as TRL's disable_dropout
            from ..modeling import disable_dropout

            disable_dropout(model)
        self.packed = self.use_packing(model=model)
        self.scorer = self.train_module("model", model, PerTokenScalar(model))  # DDP / FSDP2 under torchrun
        self.pad_id = pad_token_id(self.tokenizer)
        self.train_pairs = self._encode_all(train_dataset, "train_dataset")
        self.eval_pairs = self._encode_all(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        longest = max(len(ids) for pair in self.train_pairs + (self.eval_pairs or []) for ids in pair[:2])
        guards.check_sequence_length({"model": model}, longest,
                                     what=f"max_length: the longest prompt + response (cut to max_length={self.args.max_length})")
        # one micro-batch index = per_device_train_batch_size pairs on every rank
        self.global_batch_size = self.args.per_device_train_batch_size * self.dist.world_size
        self.batches_per_epoch = math.ceil(len(self.train_pairs) / self.global_batch_size)
        if self.args.max_steps > 0:
            total = self.args.max_steps
        else:
            total = math.ceil(self.args.num_train_epochs * self.batches_per_epoch / self.args.gradient_accumulation_steps)
        self.create_optimizer_and_scheduler(self.model.parameters(), total)
        self.maybe_resume()

    def _encode(self, record):
        """(chosen ids, rejected ids, margin) within max_length (``encode_pair``)."""
        chosen, rejected, margin, _ = encode_pair(self.tokenizer, record, self.args.max_length)
        return chosen, rejected, margin

    def _encode_all(self, dataset, name: str):
        """Encoded pairs; pairs whose chosen and rejected sequences are identical within max_length carry no
        preference and are dropped with one warning (an error when none is left)."""
        pairs = [self._encode(r) for r in check_dataset(dataset, "rm", name)]
        kept = [p for p in pairs if p[0] != p[1]]
        if len(kept) < len(pairs):
            message = (f"{name}: {len(pairs) - len(kept)} of {len(pairs)} pairs have identical chosen and rejected "
                       f"tokens within max_length={self.args.max_length}; they are dropped")
            if not kept:
                raise ValueError(message + " (none left)")
            warnings.warn(message, stacklevel=3)
        return kept

    def _micro_batch(self, index: int):
        """This rank's contiguous block of the ``index``-th global micro-batch (a function of seed and index)."""
        size = self.global_batch_size
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.train_pairs), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        return self.dist.shard([self.train_pairs[i] for i in order[position * size:(position + 1) * size].tolist()])

    def rewards(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and the rejected responses, one forward pass for both (one packed row, or one
        padded batch: ``padding_free``)."""
        sequences = [p[0] for p in pairs] + [p[1] for p in pairs]
        batch = MicroBatch(sequences, list(range(len(sequences))), packed=self.packed, pad_id=self.pad_id,
                           device=self.device)
        with self.autocast():
            scores = batch.last_token(self.scorer(batch.input_ids, batch.attention_mask, batch.position_ids))
        return scores[: len(pairs)], scores[len(pairs):]

    def compute_loss(self, pairs, num_pairs: float | None = None) -> tuple[torch.Tensor, dict]:
        """Mean Bradley-Terry loss (plus centering); sums divide by ``num_pairs`` (default: ``len(pairs)``),
        the pair count of the micro-batch on all ranks together in a distributed run."""
        chosen, rejected = self.rewards(pairs)
        margin = torch.tensor([p[2] for p in pairs], device=chosen.device)
        count = num_pairs or len(pairs)
        loss = -F.logsigmoid(chosen - rejected - margin).sum() / count
        if self.args.center_rewards_coefficient:
            loss = loss + self.args.center_rewards_coefficient * ((chosen + rejected) ** 2).sum() / count
        with torch.no_grad():  # device tensors: read once per optimizer step
            stats = {"accuracy": (chosen > rejected).float().sum() / count, "margin": (chosen - rejected).sum() / count}
        return loss, stats

    def train(self) -> list[dict]:
        args = self.args
        self.model.train()
        bar = self.progress(self.num_training_steps, self.global_step, "reward model")
        while self.global_step < self.num_training_steps:
            start = time.perf_counter()
            total_loss, accuracy = 0.0, 0.0
            steps = args.gradient_accumulation_steps
            for k in range(steps):
                pairs = self._micro_batch(self.global_step * steps + k)
                (num_pairs,) = self.dist.sum_counts(len(pairs))  # each micro-batch is a mean over all ranks' pairs
                weight = 1.0
                if not pairs:  # fewer pairs than ranks at the end of an epoch: a zero-weight pass keeps every
                    pairs, weight = self.train_pairs[:1], 0.0  # rank in the same collectives
                with self.dist.gradient_sync([self.scorer], sync=k == steps - 1):
                    loss, stats = self.compute_loss(pairs, num_pairs)
                    # DDP / FSDP2 average gradients over ranks: grad_scale turns that into the global-batch mean
                    (loss * (weight * self.dist.grad_scale / steps)).backward()
                total_loss = total_loss + loss.detach() * (weight / steps)
                accuracy = accuracy + stats["accuracy"] * (weight / steps)
            total_loss, accuracy = self.dist.sum_counts(float(total_loss), float(accuracy))
            grad_norm = float(self.optimizer_step(list(self.model.parameters()), loss=total_loss))
            self.global_step += 1
            metrics = {}
            if self.global_step % args.logging_steps == 0 or self.global_step == self.num_training_steps:
                metrics = {"loss": total_loss, "accuracy": accuracy, "grad_norm": grad_norm,
                           "lr": self.scheduler.get_last_lr()[0], "step_time_s": time.perf_counter() - start}
                self.show(bar, loss=total_loss, acc=accuracy)
            # evaluation has its own cadence: every eval_steps steps, logged with the step's metrics if any
            if (self.eval_pairs is not None and args.eval_steps and self.global_step % args.eval_steps == 0
                    and self.global_step < self.num_training_steps):  # the last step is evaluated below
                metrics.update(self.evaluate())
            if metrics:
                self.log(metrics)
            bar.update(1)
            self.maybe_save()
        bar.close()
        if self.eval_pairs is not None:
            self.log(self.evaluate())
        self.finish("reward")
        return self.logger.history

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out pairwise accuracy (``r_chosen > r_rejected``) and loss (every rank evaluates all pairs)."""
        self.model.eval()
        size = self.args.per_device_eval_batch_size
        correct, loss, count = 0.0, 0.0, 0
        for start in range(0, len(self.eval_pairs), size):
            pairs = self.eval_pairs[start:start + size]
            chosen, rejected = self.rewards(pairs)
            margin = torch.tensor([p[2] for p in pairs], device=chosen.device)
            correct += float((chosen > rejected).sum())
            loss += float(-F.logsigmoid(chosen - rejected - margin).sum())
            count += len(pairs)
        self.model.train()
        return {"eval_accuracy": correct / count, "eval_loss": loss / count}


def encode_pair(tokenizer, record, limit: int) -> tuple[list[int], list[int], float, int]:
    """(chosen ids, rejected ids, margin, prompt length) within ``limit`` tokens. A prompt too long to leave room
    for the longer response is cut from the left (BOS kept), so that the responses, which the reward must tell
    apart, stay; responses longer than that are cut from the right."""
    prompt = encode_prompt(tokenizer, record["prompt"])
    chosen = encode_completion(tokenizer, record["chosen"])
    rejected = encode_completion(tokenizer, record["rejected"])
    room = limit - max(len(chosen), len(rejected))
    if len(prompt) > room:
        keep = max(room, 1 if prompt else 0)  # at least one prompt token (BOS) when the responses fill it all
        prompt = truncate_left(prompt, keep, tokenizer.bos_token_id)
    return (prompt + chosen)[:limit], (prompt + rejected)[:limit], float(record.get("margin", 0.0)), len(prompt)
