"""Sampling with transformers' ``generate``: exact, works on any (PEFT, wrapped) causal LM; slower than vLLM.

Samples come from the model the trainer holds, so ``update_weights`` has nothing to copy. Prompts are encoded
by `humanline.data.tokenize.encode_prompt`, the function the trainer uses, so ``prompt_ids`` are the
trainer's ids.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationConfig

from humanline.data.tokenize import encode_prompts
from humanline.errors import HumanlineError
from humanline.rollout.base import Prompt, Rollout


def unwrap_model(model: Any) -> Any:
    """The module under accelerate / DDP / FSDP / ``torch.compile`` wrappers. A PEFT model is kept as it is:
    its ``generate`` runs the adapters."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed, accelerate
            model = model.module
        else:
            return model


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids (chat
    models often end a turn with a token other than the tokenizer's EOS, e.g. Llama 3's ``<|eot_id|>``)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, gen_eos):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise HumanlineError("the tokenizer has no EOS token: generation could never stop")
    return ids


def encode_checked(tokenizer: Any, prompts: list[Prompt]) -> list[list[int]]:
    """Prompt ids exactly as the trainer encodes them (`encode_prompts`); an empty prompt is an error."""
    encoded = encode_prompts(tokenizer, prompts)
    for i, ids in enumerate(encoded):
        if not ids:
            raise HumanlineError(f"prompt {i} encodes to no tokens: {str(prompts[i])[:80]!r}")
    return encoded


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch inside a forked RNG so that the caller's global RNG state is left untouched."""
    if seed is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFGenerator:
    """Batched ``model.generate`` with left padding and a KV cache.

    ``temperature=0`` is greedy decoding. Every other sampling knob (top-k, repetition penalty, ...) is
    neutralised even if the checkpoint's ``generation_config.json`` sets it, so samples follow exactly
    softmax(logits / temperature) restricted by ``top_p``. Memory: ``generate`` keeps the raw logits of every
    step (``batch_size x max_new_tokens x vocab`` in the model's dtype) to give the behaviour log-probs; lower
    ``batch_size`` for large vocabularies and long completions.
    """

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_p: float = 1.0, batch_size: int = 64) -> None:
        if max_new_tokens < 1:
            raise HumanlineError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if temperature < 0:
            raise HumanlineError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise HumanlineError(f"top_p must be in (0, 1], got {top_p}")
        if batch_size < 1:
            raise HumanlineError(f"batch_size must be at least 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p, self.batch_size = (
            max_new_tokens, temperature, top_p, batch_size)
        self.eos_ids = eos_token_ids(unwrap_model(model), tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_ids[0]

    def update_weights(self, model: Any) -> None:
        """Sample from ``model`` from now on (no copy: this backend uses the training model directly)."""
        self.model = model

    def _generation_config(self, model: Any) -> GenerationConfig:
        sample = self.temperature > 0
        # Unset (None) fields inherit the checkpoint's generation_config: set every knob that changes the
        # distribution. Greedy ignores the sampling-only ones (setting them there only draws warnings).
        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=0, typical_p=1.0,
                        epsilon_cutoff=0.0, eta_cutoff=0.0) if sample else {}
        if sample and getattr(getattr(model, "generation_config", None), "min_p", None) is not None:
            sampling["min_p"] = 0.0  # 0 filters nothing
        return GenerationConfig(
            max_new_tokens=self.max_new_tokens, min_length=0, do_sample=sample, num_beams=1,
            num_return_sequences=1, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True,
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id, return_dict_in_generate=True,
            output_logits=True, **sampling,
        )

    def generate(self, prompts: list[Prompt], *, n: int = 1, seed: int | None = None) -> list[Rollout]:
        """``n`` samples per prompt, grouped in prompt order. The same ``seed`` (and batch size) gives the
        same samples on the same device; ``seed=None`` draws from torch's global RNG."""
        if n < 1:
            raise HumanlineError(f"n (samples per prompt) must be at least 1, got {n}")
        encoded = encode_checked(self.tokenizer, prompts)
        jobs = [(g, ids) for g, ids in enumerate(encoded) for _ in range(n)]
        model = unwrap_model(self.model)
        device = next(model.parameters()).device
        config = self._generation_config(model)
        was_training = model.training
        model.eval()  # no dropout while sampling
        rollouts: list[Rollout] = []
        try:
            with torch.no_grad(), seeded(seed, device):
                for start in range(0, len(jobs), self.batch_size):
                    chunk = jobs[start:start + self.batch_size]
                    rollouts.extend(self._generate_batch(model, chunk, prompts, config, device))
        finally:
            model.train(was_training)
        return rollouts

    def _generate_batch(self, model: Any, jobs: list[tuple[int, list[int]]], prompts: list[Prompt],
                        config: GenerationConfig, device: torch.device) -> list[Rollout]:
        width = max(len(ids) for _, ids in jobs)
        input_ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, (_, ids) in enumerate(jobs):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             generation_config=config)
        new_tokens = out.sequences[:, width:]
        # `logits` are the raw model outputs of each step (before temperature / top-p), so these are the
        # temperature-1 log-probs a re-scoring forward pass gives (see rollout/base.py). One step at a time
        # keeps the fp32 copy to [B, V].
        logps = torch.stack([
            torch.log_softmax(step.float(), dim=-1).gather(1, new_tokens[:, t:t + 1]).squeeze(1)
            for t, step in enumerate(out.logits)
        ], dim=1)
        tokens_list, logps_list = new_tokens.tolist(), logps.tolist()
        eos = set(self.eos_ids)
        rollouts = []
        for row, (group, ids) in enumerate(jobs):
            tokens = tokens_list[row]
            stop = next((t for t, tok in enumerate(tokens) if tok in eos), None)
            end = len(tokens) if stop is None else stop + 1  # keep the EOS, drop the padding after it
            completion_ids = tokens[:end]
            rollouts.append(Rollout(
                prompt=prompts[group], prompt_ids=list(ids), completion_ids=completion_ids,
                completion=self.tokenizer.decode(completion_ids, skip_special_tokens=True),
                logps=logps_list[row][:end], group=group, finished=stop is not None,
            ))
        return rollouts
