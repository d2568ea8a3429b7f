"""PPO (and the critic-free GRPO / RLOO) for ``transformers`` causal LMs.

One step: sample responses (``generate``), score them (old / reference log-probs, values and the reward in
token-budgeted micro-batches), turn scores into advantages (GAE with a critic, or group baselines), then
``num_ppo_epochs`` passes of ``num_mini_batches`` optimizer steps with the clipped losses of ``rlhf_fast.ops``.

Under ``torchrun`` (docs/distributed.md) a step is ``per_device_train_batch_size * world_size`` prompts: each rank
samples for its block of them, the token lists are all-gathered, and the batcher splits every scoring pass and
every minibatch across the ranks by token count (one plan, computed identically on every rank, the same number of
micro-batches on each). Per-token results are summed back over ranks, so every rank holds the whole step's
experience and computes advantages and whitening on the global batch; losses divide by global counts.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from typing import Callable, Optional, Sequence

import torch

from .. import ops
from . import distributed, guards
from .base import BaseTrainer
from .config import PPOConfig
from .data import check_dataset, encode_prompt, pad_right, pad_token_id, truncate_left
from .metrics import plot_metrics
from .peft_support import adapter_disabled, apply_peft, peft_model_in
from .heads import PerTokenScalar
from .advantages import group_advantages, overlong_penalty, reinforce_pp_advantages
from .dynamic_sampling import ScoredRollout, fill_batch
from .rewards import RewardFunctions, dataset_columns
from .sampling import truncate_logits, truncates
from .packed import MicroBatch, per_token_in_micro_batches, token_logprobs
from .rollout import plan_micro_batches, response_mask
from ..rollout.generation import Generation
from ..rollout.engine import SamplingSettings

# f(prompts=, completions=, completion_ids=, **dataset columns) -> one float or None per completion (rewards.py)
RewardFunction = Callable[..., Sequence[Optional[float]]]


class PPOTrainer(BaseTrainer):
    """``PPOTrainer(args=PPOConfig(...), processing_class=tok, model=policy, ref_model=None, reward_model=rm,
    value_model=critic, train_dataset=[{"prompt"}, ...]).train()``

    ``reward_model`` is a sequence-classification model (scored on the last response token) or a Python
    function ``f(prompts, completions) -> list[float]``. ``ref_model`` defaults to a frozen copy of ``model``;
    ``value_model`` (GAE only) defaults to a copy of ``reward_model`` when that is a model. With
    ``args.critic="value_head"`` there is no ``value_model``: the critic is a scalar head on the policy's last
    hidden states (``rlhf_fast.modeling.CausalLMWithValueHead``, ``self.value_head``), trained with the policy by
    one optimizer on ``policy_loss + vf_coef * value_loss``. ``callbacks`` are called after each rollout as
    ``cb(trainer, prompts, completions) -> dict`` and their metrics are logged. ``peft_config`` (a
    ``peft.PeftConfig``) trains adapters on the policy only; with ``ref_model=None`` the reference is then the
    policy with its adapters disabled (no copy of the weights).
    """

    kind = "ppo"

    def __init__(self, args: PPOConfig | None = None, processing_class=None, model=None, ref_model=None,
                 reward_model=None, train_dataset=None, value_model=None, eval_dataset=None,
                 callbacks: Optional[list] = None, peft_config=None):
        super().__init__(args or PPOConfig(), processing_class)
        args = self.args
        if model is None:
            raise ValueError("model: a causal LM policy is required")
        if reward_model is None:
            raise ValueError("reward_model: a reward model, a function f(prompts, completions, **columns) -> scores, "
                             "or a list of them is required")
        args.check_mini_batches(self.dist.world_size)
        self.rewards = RewardFunctions(reward_model, args.reward_weights)
        reward_models = [m for _, m in self.rewards.models]
        reward_model = reward_models[0] if reward_models else None  # the critic's default initialisation
        _check_distinct(model=model, ref_model=ref_model,
                        **{("reward_model" if i == 0 else f"reward_model[{i}]"): m for i, m in enumerate(reward_models)},
                        value_model=value_model)
        model = apply_peft(model, peft_config, self.args.seed)
        value_head = args.advantage_estimator == "gae" and args.critic == "value_head"
        # with adapters and no ref_model, the reference is the policy itself with its adapters off
        self.adapter_reference = ref_model is None and peft_model_in(model) is not None
        if self.adapter_reference and value_head:
            raise ValueError("ref_model: critic='value_head' with LoRA adapters needs an explicit ref_model (the "
                             "adapter-disabled reference runs the policy's plain forward, which the value head "
                             "replaces); pass ref_model, or use critic='separate'")
        # copies first: FSDP2 shards modules in place
        ref_model = ref_model if ref_model is not None or self.adapter_reference else copy.deepcopy(model)
        self.value_model = None
        if value_head and value_model is not None:
            raise ValueError("value_model: critic='value_head' trains a value head on the policy's body, so a "
                             "separate value_model cannot be used with it; pass value_model=None, or set "
                             "critic='separate' to train value_model as the critic")
        if args.advantage_estimator == "gae" and not value_head:
            if value_model is None:
                if not isinstance(reward_model, torch.nn.Module):
                    raise ValueError("value_model: advantage_estimator='gae' needs a critic; pass value_model "
                                     "(a *ForSequenceClassification model), set critic='value_head' (a value "
                                     "head on the policy) or use 'grpo' / 'rloo'")
                value_model = copy.deepcopy(reward_model)  # initialise the critic from the reward model
            self.value_model = value_model.requires_grad_(True)
        if args.disable_dropout:
            # as TRL: with dropout, old / new / reference log-probs and values would each see another random mask,
            # so a policy that has not moved would already show a ratio != 1, clipping and KL. (Scoring also
            # runs in eval mode, see make_experience; this also turns dropout off in the training forward.)
            from ..modeling import disable_dropout

            for module in (model, ref_model, self.value_model, *reward_models):
                if isinstance(module, torch.nn.Module):
                    disable_dropout(module)
        # packed micro-batches (padding_free) in every scoring and training forward
        self.packed = self.use_packing(model=model, ref_model=ref_model, value_model=self.value_model,
                                       **{f"reward_model[{i}]": m for i, m in enumerate(reward_models)})
        self.policy = model
        # logprobs_from_hidden: the body and the fused linear loss run inside one module's forward (FusedLinearLM,
        # the model's parameters under the model's names), which is what DDP / FSDP2 wrap; else the model itself.
        # critic="value_head": CausalLMWithValueHead, the model and the head, whose forward gives both
        self.policy_train = self.train_module("model", model, self._runner(model, value_head=value_head))
        self.generator = distributed.unwrap(self.policy_train)  # what samples: the model, or the module holding it
        self.value_head = self.generator.value_head if value_head else None
        self.value_train = None
        if self.value_model is not None:
            self.value_train = self.train_module("value_model", self.value_model, PerTokenScalar(self.value_model))
        # frozen models: plain replicas under DDP, sharded under FSDP2
        if self.adapter_reference:
            self.ref_model = self.policy_train  # run inside adapter_disabled (make_experience)
        else:
            self.ref_model = self.dist.wrap(self._runner(ref_model.eval().requires_grad_(False)), trainable=False)
        self.reward_model = reward_model
        self.reward_scorers = {}  # column of self.rewards -> the wrapped scorer of that reward model
        for column, module in self.rewards.models:
            module.eval().requires_grad_(False)
            self.reward_scorers[column] = self.dist.wrap(PerTokenScalar(module), trainable=False)
        self.pad_id = pad_token_id(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id if args.stop_token == "eos" else None
        self.rollout_engine = self._make_rollout_engine(model)
        dataset = check_dataset(train_dataset, "ppo", "train_dataset")
        self.prompts = [r["prompt"] for r in dataset]
        self.columns = dataset_columns(dataset, "train_dataset")  # the other fields, for the reward functions
        self.prompt_ids = self._encode_prompts(self.prompts, "train_dataset")
        self.eval_prompts = self.eval_columns = None
        if eval_dataset is not None:
            eval_dataset = check_dataset(eval_dataset, "ppo", "eval_dataset")
            self.eval_prompts = [r["prompt"] for r in eval_dataset]
            self.eval_columns = dataset_columns(eval_dataset, "eval_dataset")
        self.eval_prompt_ids = (self._encode_prompts(self.eval_prompts, "eval_dataset")
                                if self.eval_prompts is not None else None)
        self._check_lengths(model=model, ref_model=ref_model, value_model=self.value_model,
                            **{f"reward_model[{i}]": m for i, m in enumerate(reward_models)})
        self.callbacks = list(callbacks or [])
        self.kl_coef = args.kl_coef
        self.trainable = [p for m in self.models.values() for p in m.parameters() if p.requires_grad]
        if self.value_head is not None:  # inside the policy's runner, not part of the model
            self.trainable += list(self.value_head.parameters())
        if args.max_steps > 0:
            self.num_ppo_steps = args.max_steps
        else:  # num_train_epochs passes over the prompts, in the steps of _prompt_batch
            self.num_ppo_steps = max(1, math.ceil(args.num_train_epochs * self._steps_per_epoch()))
        optimizer_steps = self.num_ppo_steps * args.num_ppo_epochs * args.num_mini_batches
        self.create_optimizer_and_scheduler(self.trainable, optimizer_steps)
        self.maybe_resume()

    def _encode_prompts(self, prompts: list[str], name: str) -> list[list[int]]:
        """Prompt ids, the last ``max_length`` tokens of each (BOS kept in front)."""
        ids = [truncate_left(encode_prompt(self.tokenizer, p), self.args.max_length, self.tokenizer.bos_token_id)
               for p in prompts]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ValueError(f"{name}[{empty[0]}]: an empty prompt, and the tokenizer has no BOS token: there is "
                             f"nothing to condition the response on ({len(empty)} such prompts); give every prompt "
                             "some text, or use a tokenizer with a BOS token")
        return ids

    def _check_lengths(self, **models) -> None:
        """Refuse, before the first rollout, sequences (longest prompt + response_length) that exceed the micro-batch
        token budget or a model's position limit."""
        args = self.args
        longest = max(map(len, self.prompt_ids + (self.eval_prompt_ids or []))) + args.response_length
        what = (f"max_length + response_length: the longest prompt (cut to max_length={args.max_length}) plus "
                f"response_length={args.response_length}")
        if longest > args.max_tokens_per_micro_batch:
            raise ValueError(f"{what} is {longest} tokens, more than max_tokens_per_micro_batch="
                             f"{args.max_tokens_per_micro_batch}; raise max_tokens_per_micro_batch or lower max_length "
                             "or response_length")
        guards.check_sequence_length({k: m for k, m in models.items() if isinstance(m, torch.nn.Module)}, longest,
                                     what=what)

    def _steps_per_epoch(self) -> int:
        return max(1, len(self.prompts) // (self.args.per_device_train_batch_size * self.dist.world_size))

    def _runner(self, model: torch.nn.Module, value_head: bool = False) -> torch.nn.Module:
        """What runs ``model``'s log-prob and loss passes: ``CausalLMWithValueHead(model)`` with a value head,
        ``FusedLinearLM(model)`` with ``logprobs_from_hidden`` (so that DDP / FSDP2 see the whole computation in one
        forward), else ``model``."""
        if value_head:
            from ..modeling import CausalLMWithValueHead

            # the head's initial weights depend on the seed only: the same on every rank and in one process
            return CausalLMWithValueHead(model, from_hidden=self.args.logprobs_from_hidden,
                                         generator=torch.Generator().manual_seed(self.args.seed))
        if not self.args.logprobs_from_hidden:
            return model
        from ..modeling import FusedLinearLM

        return FusedLinearLM(model)

    def _make_rollout_engine(self, model):
        """``args.rollout_engine``: ``hf`` samples with ``self.generator``; ``vllm`` starts an engine in this
        process with the policy's config and weights (rlhf_fast.rollout.vllm_engine)."""
        from ..rollout import make_engine

        args = self.args
        if args.rollout_engine == "vllm" and self.dist.world_size > 1:
            raise ValueError(f"rollout_engine='vllm' runs in one process; under torchrun (world_size="
                             f"{self.dist.world_size}) use rollout_engine='hf'")
        if args.rollout_engine == "vllm" and peft_model_in(model) is not None:
            raise ValueError("rollout_engine='vllm' pushes the policy's full weights and cannot take LoRA / PEFT "
                             "adapters yet; use rollout_engine='hf' with peft_config")
        return make_engine(args.rollout_engine, model=model, pad_id=self.pad_id, generator=self.generator,
                           synced_gpus=self.dist.strategy == "fsdp2" and self.dist.world_size > 1,
                           device=self.device, seed=args.seed,
                           max_model_len=args.max_length + args.response_length,
                           gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                           enable_sleep_mode=args.vllm_enable_sleep_mode)

    def close(self) -> None:
        """Stop the rollout engine (a vLLM engine's processes and memory); the trainer cannot sample after."""
        self.rollout_engine.close()

    @property
    def has_critic(self) -> bool:
        """A trained critic: a separate value model or a value head on the policy."""
        return self.value_model is not None or self.value_head is not None

    # ---- state ------------------------------------------------------------------------------------------------
    def checkpoint_extra(self) -> dict:
        return {**super().checkpoint_extra(), "kl_coef": self.kl_coef}

    def restore_extra(self, extra: dict) -> None:
        super().restore_extra(extra)
        self.kl_coef = extra.get("kl_coef", self.kl_coef)

    def _prompt_batch(self, step: int) -> list[int]:
        """Prompt indices of PPO step ``step`` on all ranks together: a fixed function of (seed, step), so
        resuming is exact, and one process with ``world_size`` times the batch size sees the same prompts."""
        size = self.args.per_device_train_batch_size * self.dist.world_size
        epoch, position = divmod(step, self._steps_per_epoch())
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.args.seed + epoch))
        chosen = order[position * size:(position + 1) * size].tolist()
        while len(chosen) < size:  # fewer prompts than a batch: cycle
            chosen += chosen[: size - len(chosen)]
        return chosen

    # ---- generation -------------------------------------------------------------------------------------------
    def generate(self, prompts: list[str], *, do_sample: bool = True, temperature: float | None = None) -> list[str]:
        """Completions (text) of the current policy for ``prompts`` with the rollout settings."""
        ids = [encode_prompt(self.tokenizer, p) for p in prompts]
        out = self._generate(ids, do_sample=do_sample, temperature=temperature)
        return self._decode(out.response_ids)

    def _generate(self, prompt_ids, *, do_sample: bool = True, temperature: float | None = None) -> Generation:
        """Sample on this rank. FSDP2 gathers parameters in every decoding step, so its ranks step in lockstep
        (``synced_gpus``) until the longest of them stops."""
        args = self.args
        engine = self.rollout_engine
        engine.wake_up()
        engine.sync_weights(self.models["model"], version=self.global_step)  # pushes only after an update
        sampling = SamplingSettings(max_new_tokens=args.response_length, temperature=temperature or args.temperature,
                                    top_p=args.top_p, top_k=args.top_k, eos_id=self.eos_id, do_sample=do_sample)
        with self.autocast():
            return engine.generate(prompt_ids, sampling)

    def _generate_global(self, prompt_ids: list[list[int]]) -> Generation:
        """Every rank samples its contiguous block of ``prompt_ids``; all ranks get all rollouts, in order.

        Cost: one ``all_gather_object`` of the token lists (a few bytes per token), small next to generation.
        """
        rank_count = self.dist.world_size
        padded = prompt_ids + prompt_ids[: (-len(prompt_ids)) % rank_count]  # equal blocks keep ranks in step
        parts = self.dist.all_gather_objects(self._generate(self.dist.shard(padded)))
        n = len(prompt_ids)
        logprobs = None if parts[0].logprobs is None else [lp for g in parts for lp in g.logprobs][:n]
        return Generation([p for g in parts for p in g.prompt_ids][:n], [r for g in parts for r in g.response_ids][:n],
                          [s for g in parts for s in g.stopped][:n], logprobs)

    def _plan(self, lengths: list[int]) -> list[list[int]]:
        """This rank's micro-batches of a batch of sequences with ``lengths`` (the same plan on every rank).

        In one process, the batcher's micro-batches; with several ranks, ``plan[rank]`` of a plan that balances
        the tokens of the whole batch across ranks with the same number of micro-batches on each. Empty
        micro-batches are kept there: the rank runs a zero-weight pass so that collectives stay matched.
        """
        if self.dist.world_size == 1:
            return plan_micro_batches(lengths, self.args.max_tokens_per_micro_batch)
        from .. import batching

        plan = batching.plan_micro_batches(lengths, self.args.max_tokens_per_micro_batch,
                                           num_ranks=self.dist.world_size)
        return [list(mb) for mb in plan[self.dist.rank]]

    def _decode(self, responses: list[list[int]]) -> list[str]:
        return self.tokenizer.batch_decode(responses, skip_special_tokens=True)

    # ---- experience -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def make_experience(self, prompt_indices: list[int]) -> dict:
        """Sample, score and compute advantages for one PPO step."""
        args = self.args
        for module in (self.policy_train, self.value_train):  # no dropout in scoring, whatever disable_dropout says
            if module is not None:
                module.eval()
        rollout, time_generate, sampling_metrics = self._rollout(prompt_indices)
        prompt_indices, gen, completions, scores = (rollout.prompt_indices, rollout.gen, rollout.completions,
                                                    rollout.scores)

        start = time.perf_counter()
        sequences = [p + r for p, r in zip(gen.prompt_ids, gen.response_ids)]
        prompt_lens = [len(p) for p in gen.prompt_ids]
        response_lens = [len(r) for r in gen.response_ids]
        # the experience lives on the training device (the ops run there; micro-batches are slices of it)
        ids, attention = (t.to(self.device) for t in pad_right(sequences, self.pad_id))
        mask = response_mask(prompt_lens, response_lens, ids.shape[1] - 1).to(self.device)
        if args.mask_truncated_completions:  # DAPO: no loss on responses cut by the length limit
            mask = mask * torch.tensor(gen.stopped, dtype=mask.dtype, device=mask.device)[:, None]
        budget = self._budget(sequences)

        def logprobs_of(model):
            def fn(batch):
                with self.autocast():
                    return token_logprobs(model, batch, temperature=args.temperature,
                                          from_hidden=args.logprobs_from_hidden)
            return fn

        values = None
        if self.value_head is not None:  # one forward of the policy and its head: old log-probs and values
            def policy_fn(batch):
                with self.autocast():
                    return self.policy_train(batch.input_ids, batch.attention_mask, temperature=args.temperature,
                                             position_ids=batch.position_ids, labels=batch.labels)
            old_logp, values = self._per_token(policy_fn, sequences, budget, outputs=2)
            old_logp, values = old_logp * mask, values * mask
        elif truncates(args.top_p, args.top_k):  # the policy is the truncated distribution sampled from
            def sampling_fn(batch):
                with self.autocast():
                    logits = self._sampling_logits(self.policy_train(**batch.model_inputs()).logits)
                    return ops.selective_log_softmax(logits, batch.labels, temperature=args.temperature)
            old_logp = self._per_token(sampling_fn, sequences, budget) * mask
        else:
            old_logp = self._per_token(logprobs_of(self.policy_train), sequences, budget) * mask
        with adapter_disabled(self.policy_train) if self.adapter_reference else contextlib.nullcontext():
            ref_logp = self._per_token(logprobs_of(self.ref_model), sequences, budget) * mask
        if self.value_model is not None:
            def value_fn(batch):
                with self.autocast():
                    return self.value_train(batch.input_ids, batch.attention_mask, batch.position_ids)
            values = self._per_token(value_fn, sequences, budget) * mask
        prompts_text = [self.prompts[i] for i in prompt_indices for _ in range(args.num_generations)]
        is_weights, engine_metrics = self._importance_weights(gen, prompt_lens, old_logp, mask)
        kl = ops.token_kl(old_logp, ref_logp, estimator="k1") * mask  # per-token log-ratio to the reference
        kl_in_reward = self.kl_coef if args.kl_penalty == "reward" else 0.0
        advantages, returns = self._advantages(scores, kl, kl_in_reward, mask, values, response_lens)
        time_score = time.perf_counter() - start + rollout.time_score
        # host copies of what planning and loss normalisation read (lengths, response tokens): no sync in update
        return dict(ids=ids, attention=attention, mask=mask, sequences=sequences, lengths=torch.tensor([len(s) for s in sequences]),
                    host_lengths=[len(s) for s in sequences], host_mask_counts=mask.sum(-1).tolist(),
                    old_logp=old_logp, ref_logp=ref_logp, values=values, advantages=advantages, returns=returns,
                    scores=scores, kl=kl.sum(-1), response_lens=torch.tensor(response_lens, dtype=torch.float32),
                    stopped=torch.tensor(gen.stopped, dtype=torch.float32), prompts=prompts_text,
                    completions=completions, reward_parts=rollout.reward_parts, time_generate=time_generate,
                    time_score=time_score, sampling_metrics=sampling_metrics,
                    rlhf_reward=scores - kl_in_reward * kl.sum(-1), is_weights=is_weights,
                    engine_metrics=engine_metrics)

    def _importance_weights(self, gen: Generation, prompt_lens, old_logp, mask):
        """Truncated importance weights of the trainer's over the engine's log-probs (``is_weights`` of the loss,
        or None) and the mismatch metrics; nothing when the engine is the trainer's own model."""
        if gen.logprobs is None:
            return None, {}
        from ..rollout.importance import importance_weights, mismatch_metrics, per_token_engine_logp

        cap = self.args.vllm_importance_sampling_cap
        engine_logp = per_token_engine_logp(prompt_lens, gen.logprobs, mask.shape[1], device=mask.device)
        metrics = mismatch_metrics(old_logp, engine_logp, mask, cap=cap)
        if not self.args.vllm_importance_sampling_correction:
            return None, metrics
        return importance_weights(old_logp, engine_logp, mask, cap=cap), metrics

    def _rollout(self, prompt_indices: list[int]):
        """Sample ``num_generations`` responses per prompt and score them; with ``dynamic_sampling``, replace the
        groups whose scores are all equal by groups of extra prompts (``fill_batch``). Returns the rollout, the
        generation time and the dynamic-sampling metrics."""
        args = self.args
        time_generate = 0.0

        def sample(indices):
            nonlocal time_generate
            start = time.perf_counter()
            prompt_ids = [self.prompt_ids[i] for i in indices for _ in range(args.num_generations)]
            gen = self._generate_global(prompt_ids)  # blocks of whole prompts: a GRPO group stays on one rank
            time_generate += time.perf_counter() - start
            start = time.perf_counter()
            rollout = self._score_rollout(indices, gen)
            rollout.time_score = time.perf_counter() - start
            return rollout

        rollout = sample(prompt_indices)
        if not args.dynamic_sampling:
            return rollout, time_generate, {}
        time_score = rollout.time_score
        rollout, metrics = fill_batch(rollout, lambda r: sample(self._extra_prompts(len(prompt_indices), r)),
                                      args.dynamic_sampling_max_rounds)
        rollout.time_score = time_score
        return rollout, time_generate, metrics

    def _extra_prompts(self, count: int, round_: int) -> list[int]:
        """Prompts of dynamic sampling's extra round ``round_``: random, a function of (seed, step, round), so
        resuming stays exact and every rank draws the same."""
        seed = (self.args.seed * 1_000_003 + self.global_step * 1_009 + round_) % (2**63)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        return [order[i % len(order)] for i in range(count)]

    def _score_rollout(self, prompt_indices: list[int], gen: Generation) -> ScoredRollout:
        """Rewards of one generation: every reward model / function, their weighted sum and the length shaping."""
        args = self.args
        sequences = [p + r for p, r in zip(gen.prompt_ids, gen.response_ids)]
        rows = [i for i in prompt_indices for _ in range(args.num_generations)]
        completions = self._decode(gen.response_ids)
        columns = {k: [v[i] for i in rows] for k, v in self.columns.items()}
        parts = self._score_parts(sequences, [self.prompts[i] for i in rows], completions, gen.response_ids, columns,
                                  self._budget(sequences))
        scores = self.rewards.combine(parts)
        if args.missing_eos_penalty is not None and self.eos_id is not None:
            scores = scores - args.missing_eos_penalty * (~torch.tensor(gen.stopped, device=scores.device)).float()
        if args.overlong_buffer_len > 0:
            lengths = torch.tensor([len(r) for r in gen.response_ids], device=scores.device)
            scores = scores + overlong_penalty(lengths, args.response_length, args.overlong_buffer_len,
                                               args.overlong_penalty_factor)
        return ScoredRollout(list(prompt_indices), gen, completions, parts, scores, args.num_generations)

    def _budget(self, sequences) -> dict:
        return dict(pad_id=self.pad_id, max_tokens=self.args.max_tokens_per_micro_batch, device=self.device,
                    micro_batches=self._plan([len(s) for s in sequences]))

    def _per_token(self, fn, sequences, budget, per_sequence: bool = False, outputs: int = 1):
        """``fn`` on this rank's micro-batches; each row is computed by one rank and zero on the others, so a
        sum over ranks gives every rank the whole batch (exactly: x + 0 = x). ``outputs > 1``: ``fn`` returns
        that many per-token tensors, all-reduced together, and so does this."""
        out = per_token_in_micro_batches(fn, sequences, budget["micro_batches"], packed=self.packed,
                                         pad_id=self.pad_id, device=self.device, per_sequence=per_sequence,
                                         outputs=outputs)
        if outputs == 1:
            return self.dist.all_reduce_sum(out)
        return tuple(self.dist.all_reduce_sum(torch.stack(out)).unbind(0))

    def _score_parts(self, sequences, prompts, completions, completion_ids, columns, budget) -> torch.Tensor:
        """``[B, F]`` score of every completion by every reward model / function (NaN: the function gave None).

        Models score on token ids in this rank's micro-batches; functions are called on this rank's rows; a sum
        over ranks gives every rank the whole table (NaN survives it, and no other rank writes that row)."""
        out = torch.zeros((len(completions), len(self.rewards)), dtype=torch.float32)
        rows = sorted(i for micro in budget["micro_batches"] for i in micro)  # this rank's share of the calls
        self.rewards.score_functions(out, rows, prompts, completions, completion_ids, columns)
        out = self.dist.all_reduce_sum(out.to(self.device))
        for column, scorer in self.reward_scorers.items():
            def fn(batch, scorer=scorer):
                with self.autocast():
                    return batch.last_token(scorer(batch.input_ids, batch.attention_mask, batch.position_ids))
            out[:, column] = guards.check_finite_scores(self._per_token(fn, sequences, budget, per_sequence=True),
                                                        source=self._reward_source(column))
        return out

    def _reward_source(self, column: int) -> str:
        """How errors name a reward model: ``reward_model``, or its place and name in a list."""
        return "reward_model" if len(self.rewards) == 1 else f"reward_model[{column}] ({self.rewards.names[column]})"

    def _advantages(self, scores, kl, kl_coef, mask, values, response_lens):
        args = self.args
        last = (mask.cumsum(-1) * mask).argmax(-1)  # position of each row's last response token
        rows = torch.arange(len(scores), device=scores.device)
        if args.advantage_estimator == "gae":
            rewards = -kl_coef * kl
            rewards[rows, last] += scores
            if args.whiten_rewards:
                rewards = ops.masked_whiten(rewards, mask, shift_mean=False)
            advantages, returns = ops.gae(rewards, values, mask, gamma=args.gamma, lam=args.lam)
        elif args.advantage_estimator == "reinforce_pp":  # per-token returns, whitened over the batch
            rewards = -kl_coef * kl
            rewards[rows, last] += scores
            advantages = reinforce_pp_advantages(rewards, mask, args.gamma)
            returns = torch.zeros_like(advantages)
        else:  # grpo / rloo: one advantage per sequence from its group (advantages.py)
            sequence_reward = scores - kl_coef * kl.sum(-1)
            sequence_adv = group_advantages(sequence_reward, args.num_generations, args.advantage_estimator,
                                            args.scale_rewards)
            advantages = sequence_adv.reshape(-1, 1) * mask
            returns = torch.zeros_like(advantages)
        if args.whiten_advantages and args.advantage_estimator not in ("grpo", "reinforce_pp"):
            advantages = ops.masked_whiten(advantages, mask)
        return advantages, returns

    # ---- update -----------------------------------------------------------------------------------------------
    def _micro_batch_loss(self, exp: dict, rows: list[int], num_tokens: float, num_seqs: int,
                          loss_weight: float = 1.0):
        """Backward of one micro-batch's share of the minibatch loss; ``loss_weight=0`` for a placeholder pass.

        Returns ``(stats, losses, tokens)``, all device tensors (no host sync here): ``stats`` are means over the
        micro-batch's response tokens (``tokens`` of them), ``losses`` (``pg_loss``, ``vf_loss``) the micro-batch's
        shares of the minibatch losses (each divides by the minibatch's global counts), so their sum over the
        micro-batches of all ranks is the minibatch loss."""
        args = self.args
        # one packed row or one padded batch (padding_free); per-token data in its layout, one value per position
        batch = MicroBatch(exp["sequences"], rows, packed=self.packed, pad_id=self.pad_id, device=self.device)
        inputs = dict(position_ids=batch.position_ids, labels=batch.labels)

        def take(name):
            return batch.take(exp[name])

        mask = take("mask")
        kl_in_loss = args.kl_penalty == "loss" and self.kl_coef > 0
        common = dict(
            ref_logp=take("ref_logp") if kl_in_loss else None, kl_coef=self.kl_coef if kl_in_loss else 0.0,
            kl_estimator=args.kl_estimator, entropy_coef=args.entropy_coef, temperature=args.temperature,
            clip_low=args.cliprange, clip_high=args.cliprange_high, dual_clip=args.dual_clip, agg=args.loss_agg,
            num_tokens=num_tokens, num_seqs=num_seqs, loss_scale=self._loss_scale(), cu_seqlens=batch.cu_seqlens,
            importance_sampling_level=args.importance_sampling_level,
            is_weights=take("is_weights") if exp.get("is_weights") is not None else None,
        )
        new_values = None
        with self.autocast():
            if self.value_head is not None:  # CausalLMWithValueHead: the policy loss and the values, one forward
                temperature = common.pop("temperature")
                loss, stats, new_values = self.policy_train(
                    batch.input_ids, batch.attention_mask, temperature=temperature, **inputs, ppo_loss=dict(
                        old_logp=take("old_logp"), advantages=take("advantages"), mask=mask, **common))
            elif args.logprobs_from_hidden:  # FusedLinearLM: body, head and loss inside the wrapped forward
                temperature = common.pop("temperature")
                loss, stats = self.policy_train(
                    batch.input_ids, batch.attention_mask, temperature=temperature, **inputs, ppo_loss=dict(
                        old_logp=take("old_logp"), advantages=take("advantages"), mask=mask, **common))
            else:
                logits = self.policy_train(**batch.model_inputs()).logits
                logits = self._sampling_logits(logits)  # top_p / top_k: the truncated distribution sampled from
                loss, stats = ops.fused_ppo_loss(logits, batch.labels, take("old_logp"), take("advantages"), mask,
                                                 **common)
            stats = {k: v.detach().float() for k, v in stats.items()}
            losses = {"pg_loss": loss.detach().float()}
            if self.value_model is not None:
                new_values = self.value_train(batch.input_ids, batch.attention_mask, batch.position_ids)
            if new_values is not None:
                vf_loss, vf_stats = ops.ppo_value_loss(new_values, take("values"), take("returns"), mask,
                                                       clip=args.cliprange_value, agg=args.loss_agg,
                                                       num_tokens=num_tokens, num_seqs=num_seqs,
                                                       loss_scale=self._loss_scale(),
                                                       cu_seqlens=batch.cu_seqlens)
                stats["vf_clip_frac"] = vf_stats["clip_frac"].detach().float()
                losses["vf_loss"] = vf_loss.detach().float()
                loss = loss + args.vf_coef * vf_loss
        # DDP / FSDP2 average gradients over ranks; grad_scale makes that the gradient of the global loss
        (loss * (loss_weight * self.dist.grad_scale)).backward()
        return stats, losses, mask.sum()

    def _sampling_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the distribution ``generate`` samples from: with ``top_p`` / ``top_k``, the truncated and
        renormalised softmax (sampling.py), in the old log-probs and in the loss alike; else ``logits``."""
        args = self.args
        return truncate_logits(logits, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

    def _loss_scale(self) -> float:
        """``seq-mean-token-sum-norm``'s divisor: a constant of the run (Dr. GRPO), never the step's padded width."""
        return self.args.loss_scale_factor or float(self.args.response_length)

    def update(self, exp: dict) -> dict:
        """``num_ppo_epochs`` x ``num_mini_batches`` optimizer steps on one rollout; returns averaged stats.

        ``pg_loss`` / ``vf_loss``: the mean over optimizer steps of the minibatch loss (the sum of its micro-batches'
        shares); the other statistics are token-weighted means over all micro-batches. Everything stays on the
        device until one reduction at the end (one all-reduce across ranks, one host read)."""
        args = self.args
        trained = [m for m in (self.policy_train, self.value_train) if m is not None]
        for module in trained:
            module.train()
        batch = exp["ids"].shape[0]
        size = batch // args.num_mini_batches
        totals: dict[str, torch.Tensor] = {}  # token-weighted sums of per-micro-batch means
        loss_sums: dict[str, torch.Tensor] = {}  # sums of loss shares: the minibatch losses, added up
        weight_sum = torch.zeros((), device=self.device)
        grad_norms = []
        for _ in range(args.num_ppo_epochs):
            # rank 0's order (ranks' RNGs differ), as a host list: indices, lengths and counts are host data
            order = self.dist.broadcast_object(torch.randperm(batch)).tolist()
            for m in range(args.num_mini_batches):
                minibatch = order[m * size:(m + 1) * size]
                step_loss = torch.zeros((), device=self.device)  # this rank's shares of the minibatch loss
                # every rank holds the whole experience, so these counts are already global
                num_tokens = max(1.0, float(sum(exp["host_mask_counts"][i] for i in minibatch)))
                micro_batches = self._plan([exp["host_lengths"][i] for i in minibatch])
                for k, micro in enumerate(micro_batches):
                    placeholder = not micro  # this rank has no sequence left: a zero-weight pass keeps it in step
                    with self.dist.gradient_sync(trained, sync=k == len(micro_batches) - 1):
                        stats, losses, tokens = self._micro_batch_loss(
                            exp, minibatch[:1] if placeholder else [minibatch[j] for j in micro], num_tokens,
                            len(minibatch), loss_weight=0.0 if placeholder else 1.0)
                    for key, value in stats.items():
                        contribution = torch.zeros_like(value) if placeholder else value * tokens
                        totals[key] = totals[key] + contribution if key in totals else contribution
                    for key, value in losses.items():
                        contribution = torch.zeros_like(value) if placeholder else value
                        loss_sums[key] = loss_sums[key] + contribution if key in loss_sums else contribution
                    if not placeholder:
                        weight_sum = weight_sum + tokens
                        step_loss = step_loss + losses["pg_loss"] + args.vf_coef * losses.get("vf_loss", 0.0)
                # the loss checked for finiteness: the minibatch loss, summed over ranks (one decision on all)
                grad_norms.append(self.optimizer_step(self.trainable, loss=self.dist.all_reduce_sum(step_loss)))
        # one reduction: every rank has the same keys (placeholder passes register theirs with zeros)
        stat_keys, loss_keys = sorted(totals), sorted(loss_sums)
        packed = torch.stack([totals[k] for k in stat_keys] + [loss_sums[k] for k in loss_keys]
                             + [weight_sum.float()])
        packed = self.dist.all_reduce_sum(packed)
        packed = torch.cat([packed, torch.stack(grad_norms).float().mean().reshape(1).to(packed.device)]).tolist()
        weight = max(1.0, packed[len(stat_keys) + len(loss_keys)])
        out = {k: packed[i] / weight for i, k in enumerate(stat_keys)}
        steps = len(grad_norms)
        out.update({k: packed[len(stat_keys) + i] / steps for i, k in enumerate(loss_keys)})
        out["grad_norm"] = packed[-1]
        return out

    def _adapt_kl(self, kl: float, batch: int) -> None:
        """Adaptive KL controller (Ziegler et al., 2019): move kl_coef so that KL tracks target_kl."""
        if self.args.target_kl is None:
            return
        error = max(-0.2, min(0.2, kl / self.args.target_kl - 1.0))
        self.kl_coef *= 1.0 + error * batch / self.args.kl_horizon

    # ---- loop -------------------------------------------------------------------------------------------------
    def step(self) -> dict:
        """One PPO step (rollout + update); logs and returns the step's metrics."""
        start = time.perf_counter()
        exp = self.make_experience(self._prompt_batch(self.global_step))
        self.rollout_engine.sleep()  # vllm sleep mode: its memory is free during the update (woken to sample)
        train_start = time.perf_counter()
        stats = self.update(exp)
        time_train = time.perf_counter() - train_start
        total = time.perf_counter() - start
        reward, reward_std, rlhf_reward, kl = torch.stack([  # one host read for the rollout's statistics
            exp["scores"].mean(), exp["scores"].std(), exp["rlhf_reward"].mean(), exp["kl"].mean()]).tolist()
        metrics = {
            "reward": reward, "reward_std": reward_std, "rlhf_reward": rlhf_reward, "kl": kl, "kl_coef": self.kl_coef,
            "entropy": stats.get("entropy", float("nan")), "clip_frac": stats.get("clip_frac", float("nan")),
            "approx_kl": stats.get("approx_kl", float("nan")), "pg_loss": stats["pg_loss"],
            "response_length": float(exp["response_lens"].mean()), "eos_frac": float(exp["stopped"].mean()),
            "grad_norm": stats["grad_norm"], "lr": self.scheduler.get_last_lr()[0],
            "time_generate_s": exp["time_generate"], "time_score_s": exp["time_score"], "time_train_s": time_train,
            "tokens_per_s": float(exp["lengths"].sum()) / total,
        }
        if self.has_critic:
            metrics.update(vf_loss=stats["vf_loss"], vf_clip_frac=stats["vf_clip_frac"])
        metrics.update(self.rewards.metrics(exp["reward_parts"].cpu()))  # rewards/{name}/mean, /std
        metrics.update(exp["sampling_metrics"])
        metrics.update(exp["engine_metrics"])
        for callback in self.callbacks:
            metrics.update(callback(self, exp["prompts"], exp["completions"]) or {})
        self._adapt_kl(kl, exp["ids"].shape[0])
        self.global_step += 1
        self.last_experience = exp
        return metrics

    def train(self) -> list[dict]:
        """PPO steps up to ``num_ppo_steps``; with an ``eval_dataset``, evaluations every ``eval_steps`` steps
        (when > 0) and always one at the end (logged with the last step's metrics, or as its own record)."""
        bar = self.progress(self.num_ppo_steps, self.global_step, "ppo")
        evaluated_at = None
        while self.global_step < self.num_ppo_steps:
            metrics = self.step()
            last = self.global_step == self.num_ppo_steps
            if self.eval_prompts is not None and (
                    last or (self.args.eval_steps and self.global_step % self.args.eval_steps == 0)):
                metrics.update(self.evaluate())
                evaluated_at = self.global_step
            if self.global_step % self.args.logging_steps == 0 or last:
                self.log(metrics)
            self.show(bar, reward=metrics["reward"], kl=metrics["kl"])
            bar.update(1)
            self.maybe_save()
        bar.close()
        if self.eval_prompts is not None and evaluated_at != self.global_step:  # resumed at the end: nothing ran
            self.log(self.evaluate())
        self.finish("ppo")
        return self.logger.history

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward of one sampled completion per ``eval_dataset`` prompt (sampling as in the rollouts)."""
        gen = self._generate_global(self.eval_prompt_ids)  # the eval prompts are split across ranks like the rollouts
        sequences = [p + r for p, r in zip(gen.prompt_ids, gen.response_ids)]
        budget = self._budget(sequences)
        scores = self.rewards.combine(self._score_parts(sequences, self.eval_prompts, self._decode(gen.response_ids),
                                                        gen.response_ids, self.eval_columns, budget))
        return {"eval_reward": float(scores.mean()),
                "eval_response_length": sum(map(len, gen.response_ids)) / len(gen.response_ids)}

    def finish(self, name: str) -> None:
        super().finish(name)
        if self.args.plot and self.dist.is_main:
            plot_metrics(self.logger.history, os.path.join(self.args.output_dir, "ppo_reward_kl.png"),
                         keys=["reward", "kl", "entropy", "clip_frac", "response_length"], title="PPO")


def _check_distinct(**models) -> None:
    """Refuse one object (or shared parameters) in two roles where one of them is trained: the trainer freezes
    the reference and the reward model (``requires_grad_(False)``), so a policy passed as its own reference, or a
    critic passed as the reward model, would silently never train (TRL refuses ``model is ref_model`` too)."""
    trained = {"model", "value_model"}
    hints = {("model", "ref_model"): "pass ref_model=None for a frozen copy of the policy",
             ("reward_model", "value_model"): "pass value_model=None to initialise the critic as a copy of the "
                                              "reward model"}
    named = [(name, m) for name, m in models.items() if isinstance(m, torch.nn.Module)]
    for i, (first, a) in enumerate(named):
        for second, b in named[i + 1:]:
            if first not in trained and second not in trained:
                continue  # two frozen models may share weights
            hint = hints.get((first, second)) or hints.get((second, first)) or "pass a separate copy (copy.deepcopy)"
            if a is b:
                raise ValueError(f"{second}: the same object as {first}; {first} and {second} must be different "
                                 f"models (one of them is trained, the other frozen or trained apart); {hint}")
            shared = {id(p) for p in a.parameters()} & {id(p) for p in b.parameters()}
            if shared:
                raise ValueError(f"{second}: shares {len(shared)} parameter tensors with {first}; {first} and "
                                 f"{second} must not share weights (one of them is trained); {hint}")
