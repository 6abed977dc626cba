"""Sampling backends: ``make_generator("hf" | "vllm", model, tokenizer, **kwargs)``."""

from __future__ import annotations

from typing import Any

from humanline.errors import HumanlineError
from humanline.rollout.base import Generator, Prompt, Rollout, group_rollouts

BACKENDS = ("hf", "vllm")


def make_generator(backend: str, model: Any, tokenizer: Any, **kwargs: Any) -> Generator:
    """Build a sampling backend: ``"hf"`` (`HFGenerator`) or ``"vllm"`` (`VLLMGenerator`, needs vllm)."""
    if backend == "hf":
        from humanline.rollout.hf import HFGenerator

        return HFGenerator(model, tokenizer, **kwargs)
    if backend == "vllm":
        from humanline.rollout.vllm import VLLMGenerator

        return VLLMGenerator(model, tokenizer, **kwargs)
    raise HumanlineError(f"unknown rollout backend '{backend}': use one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "Generator", "Prompt", "Rollout", "group_rollouts", "make_generator"]
