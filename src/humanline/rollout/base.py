"""What a rollout backend returns (`Rollout`) and the interface every backend implements (`Generator`).

Log-prob convention. ``Rollout.logps[t]`` is ``log softmax(raw logits)[completion_ids[t]]`` of the model that
sampled, at temperature 1 and without top-p / top-k: the distribution of the *model*, not of the sampler.
That is exactly what a re-scoring forward pass of the same weights over ``prompt_ids + completion_ids``
gives, so GRPO's importance ratio ``pi_theta / pi_old`` compares like with like whatever temperature was
used for sampling. (vLLM's default ``logprobs_mode="raw_logprobs"`` is the same quantity.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Prompt = str | list[dict[str, Any]]  # plain text, or chat messages [{"role": ..., "content": ...}, ...]


@dataclass
class Rollout:
    """One sampled completion of one prompt."""

    prompt: Prompt  # the prompt as given (text or messages)
    prompt_ids: list[int]  # the prompt encoded by `humanline.data.tokenize.encode_prompt`
    completion_ids: list[int]  # sampled tokens, ending with EOS when `finished`; never padded
    completion: str  # completion_ids decoded, special tokens skipped
    logps: list[float]  # behaviour log-probs of completion_ids (see the module docstring), one per token
    group: int  # index of the prompt in the `generate` call; the n samples of a prompt share it
    finished: bool  # True if the completion ended with EOS (False: cut at max_new_tokens)
    info: dict[str, Any] = field(default_factory=dict)  # backend extras, never needed downstream

    @property
    def num_tokens(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class Generator(Protocol):
    """A sampling backend. ``generate`` returns ``n`` rollouts per prompt, grouped in prompt order
    (prompt 0's n samples, then prompt 1's, ...)."""

    def generate(self, prompts: list[Prompt], *, n: int = 1, seed: int | None = None) -> list[Rollout]: ...

    def update_weights(self, model: Any) -> None:
        """Make the backend sample from ``model``'s current weights (no-op if it uses the model itself)."""
        ...


def group_rollouts(rollouts: list[Rollout]) -> list[list[Rollout]]:
    """Rollouts split by ``group``, groups in order of first appearance."""
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.group, []).append(r)
    return list(groups.values())
