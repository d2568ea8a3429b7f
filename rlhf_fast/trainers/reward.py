"""Bradley-Terry reward model on ``{prompt, chosen, rejected}``: ``-logsigmoid(r_chosen - r_rejected - margin)``."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from .base import BaseTrainer
from .config import RewardConfig
from .data import check_dataset, encode_completion, encode_prompt, pad_right, pad_token_id
from .heads import PerTokenScalar, last_token_scores


class RewardTrainer(BaseTrainer):
    """``RewardTrainer(model=AutoModelForSequenceClassification(num_labels=1), args=RewardConfig(...),
    train_dataset=[{"prompt", "chosen", "rejected"}, ...], eval_dataset=..., processing_class=tok).train()``"""

    def __init__(self, model, args: RewardConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None):
        super().__init__(args or RewardConfig(), processing_class)
        self.model = model
        self.scorer = self.train_module("model", model, PerTokenScalar(model))  # DDP / FSDP2 under torchrun
        self.pad_id = pad_token_id(self.tokenizer)
        self.train_pairs = [self._encode(r) for r in check_dataset(train_dataset, "rm", "train_dataset")]
        self.eval_pairs = ([self._encode(r) for r in check_dataset(eval_dataset, "rm", "eval_dataset")]
                           if eval_dataset is not None else None)
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
        prompt = encode_prompt(self.tokenizer, record["prompt"])
        limit = self.args.max_length
        chosen = (prompt + encode_completion(self.tokenizer, record["chosen"]))[:limit]
        rejected = (prompt + encode_completion(self.tokenizer, record["rejected"]))[:limit]
        return chosen, rejected, float(record.get("margin", 0.0))

    def _micro_batch(self, index: int):
        """This rank's contiguous block of the ``index``-th global micro-batch (a function of seed and index)."""
        size = self.global_batch_size
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.train_pairs), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        return self.dist.shard([self.train_pairs[i] for i in order[position * size:(position + 1) * size].tolist()])

    def rewards(self, pairs) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the chosen and the rejected responses, one forward pass for both."""
        ids, attention = pad_right([p[0] for p in pairs] + [p[1] for p in pairs], self.pad_id)
        attention = attention.to(self.device)
        with self.autocast():
            scores = last_token_scores(self.scorer(ids.to(self.device), attention), attention)
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
        with torch.no_grad():
            stats = {"accuracy": float((chosen > rejected).float().sum()) / count,
                     "margin": float((chosen - rejected).sum()) / count}
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
                total_loss += loss.item() * weight / steps
                accuracy += stats["accuracy"] * weight / steps
            total_loss, accuracy = self.dist.sum_counts(total_loss, accuracy)
            grad_norm = self.optimizer_step(list(self.model.parameters()))
            self.global_step += 1
            if self.global_step % args.logging_steps == 0 or self.global_step == self.num_training_steps:
                metrics = {"loss": total_loss, "accuracy": accuracy, "grad_norm": grad_norm,
                           "lr": self.scheduler.get_last_lr()[0], "step_time_s": time.perf_counter() - start}
                if self.eval_pairs is not None and args.eval_steps and self.global_step % args.eval_steps == 0:
                    metrics.update(self.evaluate())
                self.log(metrics)
                bar.set_postfix(loss=f"{total_loss:.3f}", acc=f"{accuracy:.2f}")
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
