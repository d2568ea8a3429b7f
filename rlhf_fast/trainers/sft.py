"""Supervised fine-tuning of a causal LM on ``{prompt, completion}``, loss on the completion tokens only."""
from __future__ import annotations

import math
import time
import warnings

import torch

from .. import ops
from . import guards
from .base import BaseTrainer
from .config import SFTConfig
from .data import check_dataset, encode_completion, encode_prompt, pad_right, pad_token_id
from .peft_support import apply_peft
from .packed import MicroBatch


class SFTTrainer(BaseTrainer):
    """``SFTTrainer(model=..., args=SFTConfig(...), train_dataset=[{"prompt", "completion"}, ...],
    processing_class=tokenizer, peft_config=None).train()``; with a ``peft.PeftConfig`` only the adapters train."""

    kind = "sft"

    def __init__(self, model, args: SFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None):
        super().__init__(args or SFTConfig(), processing_class)
        model = apply_peft(model, peft_config, self.args.seed)
        self.model = model
        self.packed = self.use_packing(model=model)  # before wrapping: the packed attention is set on the model
        self.train_model = self.train_module("model", model)  # DDP / FSDP2 under torchrun
        self.train_examples = self._encode_all(train_dataset, "train_dataset")
        self.eval_examples = self._encode_all(eval_dataset, "eval_dataset") if eval_dataset is not None else None
        self.pad_id = pad_token_id(self.tokenizer)
        longest = max(len(ids) for ids, _ in self.train_examples + (self.eval_examples or []))
        guards.check_sequence_length({"model": model}, longest,
                                     what=f"max_length: the longest example (cut to max_length={self.args.max_length})")
        # one micro-batch index = per_device_train_batch_size examples on every rank
        self.global_batch_size = self.args.per_device_train_batch_size * self.dist.world_size
        batches_per_epoch = math.ceil(len(self.train_examples) / self.global_batch_size)
        self.batches_per_epoch = batches_per_epoch
        if self.args.max_steps > 0:
            total = self.args.max_steps
        else:
            total = math.ceil(self.args.num_train_epochs * batches_per_epoch / self.args.gradient_accumulation_steps)
        self.create_optimizer_and_scheduler(self.model.parameters(), total)
        self.maybe_resume()

    def _encode(self, record) -> tuple[list[int], int]:
        """(token ids, number of prompt tokens), truncated to max_length."""
        prompt = encode_prompt(self.tokenizer, record["prompt"])
        ids = (prompt + encode_completion(self.tokenizer, record["completion"]))[: self.args.max_length]
        return ids, len(prompt)

    def _encode_all(self, dataset, name: str) -> list[tuple[list[int], int]]:
        """Encoded examples; those with no loss token (a prompt that fills max_length, with
        ``completion_only_loss``) are dropped with one warning, and a dataset left empty is an error."""
        examples = [self._encode(r) for r in check_dataset(dataset, "sft", name)]
        kept = [e for e in examples if self.loss_token_count(e) > 0]
        if len(kept) < len(examples):
            dropped = len(examples) - len(kept)
            message = (f"{name}: {dropped} of {len(examples)} examples have no loss token within "
                       f"max_length={self.args.max_length} (the prompt fills it); "
                       + ("all of them are" if not kept else "they are") + " dropped")
            if not kept:
                raise ValueError(message + "; raise max_length or shorten the prompts")
            warnings.warn(message, stacklevel=3)
        return kept

    def loss_token_count(self, example: tuple[list[int], int]) -> int:
        """Labels of ``example`` that the loss counts: the same positions as ``_collate``'s loss mask (label
        ``t + 1`` is predicted at ``t``; with ``completion_only_loss`` only labels at positions >= prompt length)."""
        ids, prompt_len = example
        first = max(1, prompt_len) if self.args.completion_only_loss else 1
        return max(0, len(ids) - first)

    def _micro_batch(self, index: int) -> list[tuple[list[int], int]]:
        """This rank's share of the ``index``-th global micro-batch of the run.

        The global micro-batch is a fixed function of (seed, index), so resuming is exact; each rank takes a
        contiguous block of it (as ``DistributedSampler`` does, without padding), so the ranks' blocks together
        are the micro-batch one process with ``world_size`` times the batch size would see.
        """
        size = self.global_batch_size
        epoch, position = divmod(index, self.batches_per_epoch)
        order = torch.randperm(len(self.train_examples), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        return self.dist.shard([self.train_examples[i] for i in order[position * size:(position + 1) * size].tolist()])

    def _collate(self, examples):
        ids, attention = pad_right([e[0] for e in examples], self.pad_id)
        loss_mask = attention.clone()
        if self.args.completion_only_loss:
            for row, (_, prompt_len) in enumerate(examples):
                loss_mask[row, :prompt_len] = 0
        # label t+1 is predicted at position t
        return ids.to(self.device), attention.to(self.device), loss_mask[:, 1:].to(self.device)

    def compute_loss(self, examples, num_tokens: int | None = None) -> tuple[torch.Tensor, int]:
        """Sum of completion-token NLL divided by ``num_tokens`` (default: this batch's count); one packed row
        or one padded batch (``padding_free``)."""
        batch = MicroBatch([e[0] for e in examples], list(range(len(examples))), packed=self.packed,
                           pad_id=self.pad_id, device=self.device)
        loss_mask = batch.take(self._collate(examples)[2].float())  # label positions -> this batch's layout
        with self.autocast():
            logits = self.train_model(**batch.model_inputs()).logits
        logp = ops.selective_log_softmax(logits, batch.labels)
        count = int(loss_mask.sum())
        return -(logp * loss_mask).sum() / max(1, num_tokens or count), count

    def train(self) -> list[dict]:
        args = self.args
        self.model.train()
        bar = self.progress(self.num_training_steps, self.global_step, "sft")
        while self.global_step < self.num_training_steps:
            start = time.perf_counter()
            first = self.global_step * args.gradient_accumulation_steps
            batches = [self._micro_batch(first + k) for k in range(args.gradient_accumulation_steps)]
            # the loss divides by the completion tokens of the whole step, on all ranks together
            (tokens,) = self.dist.sum_counts(sum(self.loss_token_count(e) for batch in batches for e in batch))
            total_loss = 0.0
            for k, batch in enumerate(batches):
                weight = 1.0
                if not batch:  # fewer examples than ranks at the end of an epoch: a zero-weight pass keeps
                    batch, weight = self.train_examples[:1], 0.0  # every rank in the same collectives
                with self.dist.gradient_sync([self.train_model], sync=k == len(batches) - 1):
                    loss, _ = self.compute_loss(batch, num_tokens=tokens)
                    (loss * (weight * self.dist.grad_scale)).backward()  # DDP / FSDP2 average over ranks
                total_loss = total_loss + loss.detach() * weight  # a device tensor: no host sync per micro-batch
            (total_loss,) = self.dist.sum_counts(float(total_loss))
            grad_norm = float(self.optimizer_step(list(self.model.parameters()), loss=total_loss))
            self.global_step += 1
            elapsed = time.perf_counter() - start
            if self.global_step % args.logging_steps == 0 or self.global_step == self.num_training_steps:
                record = self.log({"loss": total_loss, "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0],
                                   "tokens_per_s": tokens / elapsed})
                self.show(bar, loss=record["loss"])
            bar.update(1)
            self.maybe_save()
        bar.close()
        if self.eval_examples is not None:
            self.log({"eval_loss": self.evaluate()})
        self.finish("sft")
        return self.logger.history

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean completion-token NLL over ``eval_dataset`` (every rank evaluates all of it: eval sets are small,
        and FSDP2 needs every rank in every forward)."""
        self.model.eval()
        size = self.args.per_device_eval_batch_size
        total, count = 0.0, 0
        for start in range(0, len(self.eval_examples), size):
            loss, tokens = self.compute_loss(self.eval_examples[start:start + size], num_tokens=1)
            total, count = total + float(loss), count + tokens
        self.model.train()
        return total / max(1, count)
