"""Sampling with a colocated vLLM engine (``pip install 'humanline[vllm]'``): fast, keeps its own weight copy.

The engine lives in the training process on the same GPU (``gpu_memory_utilization`` is its share). vLLM is
imported only when a `VLLMGenerator` is built. ``update_weights`` copies the policy's weights into the engine
in place, which needs the engine in this process: we default ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` before
building it (as TRL's colocate mode and verl do). Single process, tensor parallel 1.

Log-probs are vLLM's ``raw_logprobs`` (its default ``logprobs_mode``): log-softmax of the raw logits, i.e. the
temperature-1 model distribution, the same convention as the HF backend (see rollout/base.py).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch

from humanline.errors import HumanlineError
from humanline.rollout.base import Prompt, Rollout
from humanline.rollout.hf import encode_checked, eos_token_ids, unwrap_model

_INSTALL_HINT = "the vLLM backend needs vllm: pip install 'humanline[vllm]'"


def _model_path(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    model = unwrap_model(model)
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    path = getattr(base, "name_or_path", None) or getattr(base.config, "_name_or_path", None)
    if not path:
        raise HumanlineError("vLLM needs the model's folder or hub id: pass a path, or a model loaded with "
                             "from_pretrained")
    return str(path)


def _generation_source(model: Any) -> Any:
    """Something holding the model's ``generation_config`` (for its EOS ids): the model, or one read from
    a path."""
    if not isinstance(model, (str, os.PathLike)):
        return unwrap_model(model)
    from types import SimpleNamespace

    from transformers import GenerationConfig
    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(model)))
    except OSError:  # no generation_config.json: the tokenizer's EOS is all we have
        return None


def merged_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """The policy's weights under the base model's parameter names, LoRA adapters merged, WITHOUT touching the
    training model (merge / unmerge in place is not exact in bf16). Plain LoRA is merged tensor by tensor;
    other adapter kinds (DoRA, IA3, trainable tokens...) fall back to ``merge_and_unload`` on a deep copy."""
    model = unwrap_model(model)
    if not hasattr(model, "peft_config"):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    simple = (
        model.peft_config[adapter].peft_type.value == "LORA"
        and not any(m.use_dora.get(a, False) for m in layers.values() for a in m.active_adapters)
        and not any("trainable_tokens" in k for k in base.state_dict())
    )
    if not simple:
        merged = copy.deepcopy(model).merge_and_unload()
        return {k: v.detach() for k, v in merged.state_dict().items()}

    state = base.state_dict()
    out: dict[str, torch.Tensor] = {}
    # modules_to_save: the trained copy replaces the original; take originals first, then override.
    for key, value in state.items():
        if ".original_module." in key:
            out[key.replace(".original_module.", ".").replace(".base_layer.", ".")] = value.detach()
    for key, value in state.items():
        if ".lora_" in key or ".original_module." in key:
            continue
        if ".modules_to_save." in key:
            prefix, rest = key.split(".modules_to_save.", 1)
            name, tail = rest.split(".", 1)
            if name != adapter:
                continue
            key = f"{prefix}.{tail}"
        out[key.replace(".base_layer.", ".")] = value.detach()
    with torch.no_grad():
        for name, layer in layers.items():
            if layer.merged:  # the adapter is already inside base_layer.weight
                continue
            deltas = [layer.get_delta_weight(a) for a in layer.active_adapters
                      if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {})]
            if deltas:
                weight = layer.get_base_layer().weight
                out[f"{name}.weight"] = (weight.float() + sum(d.float() for d in deltas)).to(weight.dtype)
    return out


class VLLMGenerator:
    """A colocated ``vllm.LLM``. ``model`` is a path / hub id, or the policy (its weights are pushed into the
    engine at once when ``sync_on_init``, so a policy that differs from its checkpoint samples correctly)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, gpu_memory_utilization: float = 0.3, enable_prefix_caching: bool = True,
                 dtype: str = "auto", max_model_len: int | None = None, sync_on_init: bool = True,
                 **llm_kwargs: Any) -> None:
        # Keep the engine in this process so update_weights can reach its model (read at engine build).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            import vllm
        except ImportError as err:
            raise HumanlineError(_INSTALL_HINT) from err
        if max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise HumanlineError(f"bad sampling settings: max_new_tokens={max_new_tokens} (>= 1), "
                                 f"temperature={temperature} (>= 0), top_p={top_p} (in (0, 1])")
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.eos_ids = eos_token_ids(_generation_source(model), tokenizer)
        kwargs: dict[str, Any] = dict(model=_model_path(model), gpu_memory_utilization=gpu_memory_utilization,
                                      enable_prefix_caching=enable_prefix_caching, dtype=dtype,
                                      max_model_len=max_model_len)
        from vllm.engine.arg_utils import EngineArgs
        if "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}:  # vllm >= 0.10.1
            kwargs["logprobs_mode"] = "raw_logprobs"
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        if sync_on_init and not isinstance(model, (str, os.PathLike)):
            self.update_weights(model)

    def _engine_model(self) -> Any:
        executor = getattr(getattr(self.llm, "llm_engine", None), "model_executor", None)
        worker = getattr(executor, "driver_worker", None)
        worker = getattr(worker, "worker", worker)  # V1 wraps the worker in a WorkerWrapperBase
        runner = getattr(worker, "model_runner", None)
        if runner is None:
            raise HumanlineError("cannot reach the vLLM engine's model to update its weights: build the "
                                 "generator with VLLM_ENABLE_V1_MULTIPROCESSING=0 (in-process engine)")
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def update_weights(self, model: Any) -> None:
        """Copy ``model``'s current weights (LoRA merged, training model untouched) into the engine, then drop
        the prefix cache, whose KV entries were computed with the old weights."""
        with torch.no_grad():
            self._engine_model().load_weights(merged_state_dict(model).items())
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[Prompt], *, n: int = 1, seed: int | None = None) -> list[Rollout]:
        """``n`` samples per prompt, grouped in prompt order; a seed makes the run reproducible."""
        if n < 1:
            raise HumanlineError(f"n (samples per prompt) must be at least 1, got {n}")
        encoded = encode_checked(self.tokenizer, prompts)
        params = [
            self._vllm.SamplingParams(
                n=n, temperature=self.temperature, top_p=self.top_p, max_tokens=self.max_new_tokens,
                logprobs=0, stop_token_ids=self.eos_ids, detokenize=False,
                # vLLM seeds the n samples of a request seed, seed+1, ...: spread prompts n apart.
                seed=None if seed is None else seed + g * n,
            )
            for g in range(len(prompts))
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], sampling_params=params,
                                    use_tqdm=False)
        eos = set(self.eos_ids)
        rollouts = []
        for g, (ids, request) in enumerate(zip(encoded, outputs)):
            for sample in sorted(request.outputs, key=lambda o: o.index):
                tokens = list(sample.token_ids)
                stop = next((t for t, tok in enumerate(tokens) if tok in eos), None)
                tokens = tokens if stop is None else tokens[:stop + 1]
                logps = [float(sample.logprobs[t][tok].logprob) for t, tok in enumerate(tokens)]
                rollouts.append(Rollout(
                    prompt=prompts[g], prompt_ids=list(ids), completion_ids=tokens,
                    completion=self.tokenizer.decode(tokens, skip_special_tokens=True), logps=logps, group=g,
                    finished=stop is not None, info={"finish_reason": sample.finish_reason},
                ))
        return rollouts
