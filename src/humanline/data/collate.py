"""Tokenised examples -> padded tensors (docs/DESIGN.md), and the seeded batch order.

Padding is dynamic (to the longest row of the micro-batch) and on the right. Labels are -100 on prompt
and padding positions, decided from the lengths we built, never by comparing with the pad id: with
pad == EOS the completion's final EOS must stay a label.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from humanline.errors import DataError

IGNORE_INDEX = -100


def _pad(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids, attention_mask, labels) for (prompt_ids, completion_ids) rows, right-padded."""
    width = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        input_ids[i, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, : n + m] = 1
        labels[i, n : n + m] = torch.tensor(completion, dtype=torch.long)
    return input_ids, attention_mask, labels


def _shifted(rows: list[tuple[list[int], list[int]]], values: Sequence[Any], width: int, what: str) -> Tensor:
    """[len(values), width - 1] float32 per-token values aligned with the shifted labels, 0 elsewhere.

    ``values[i]`` holds one value per completion token of ``rows[i]`` (None: all 0). Like every per-token
    tensor, position t scores labels[t + 1]: completion token j sits at input position len(prompt) + j, so its
    value goes to len(prompt) + j - 1.
    """
    out = torch.zeros((len(values), width - 1), dtype=torch.float32)
    for i, v in enumerate(values):
        if v is None:
            continue
        prompt, completion = rows[i]
        if len(v) != len(completion):
            raise ValueError(f"row {i}: {len(v)} {what} for {len(completion)} completion tokens")
        start = len(prompt) - 1
        out[i, start : start + len(v)] = torch.as_tensor(v, dtype=torch.float32)
    return out


def collate(examples: Sequence[Mapping[str, Any]], objective: str, *, pad_token_id: int,
            max_length: int | None = None) -> dict[str, Any]:
    """One micro-batch of tensors for ``objective`` (fields in docs/DESIGN.md).

    ``kto``: rows B..2B-1 pair prompt i with completion (i+1) mod B, the mismatched pairs of the KL
    estimate; with B == 1 the KL row is the example itself (there is no other completion to borrow).
    ``max_length``, when given, cuts those KL completions so the borrowed pair also fits it.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: use tokenizer.pad_token_id, or eos_token_id if it has none")
    b = len(examples)
    prompts = [list(e["prompt_ids"]) for e in examples]
    if objective == "dpo":
        rows = [(p, list(e["chosen_ids"])) for p, e in zip(prompts, examples)]
        rows += [(p, list(e["rejected_ids"])) for p, e in zip(prompts, examples)]
    elif objective in ("sft", "kto", "grpo"):
        rows = [(p, list(e["completion_ids"])) for p, e in zip(prompts, examples)]
        if objective == "kto":
            for i, p in enumerate(prompts):
                other = rows[(i + 1) % b][1]
                rows.append((p, other[: max_length - len(p)] if max_length else other))
    else:
        raise ValueError(f"unknown objective '{objective}'")

    input_ids, attention_mask, labels = _pad(rows, pad_token_id)
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if objective == "kto":
        batch["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
    if objective == "grpo":
        batch["advantages"] = torch.tensor([float(e["advantage"]) for e in examples], dtype=torch.float32)
        old = [e.get("old_logps") for e in examples]
        batch["old_logps"] = _shifted(rows, old, input_ids.shape[1], "old_logps")
        batch["has_old_logps"] = torch.tensor([v is not None for v in old], dtype=torch.bool)
    # Precomputed reference log-probs (precompute.py), one per completion token; not for KTO, whose KL rows
    # borrow completions within the micro-batch.
    ref_keys = ("ref_chosen_logps", "ref_rejected_logps") if objective == "dpo" else ("ref_logps",)
    if objective != "kto" and all(k in e for k in ref_keys for e in examples):
        ref = [e[k] for k in ref_keys for e in examples]  # DPO: chosen rows, then rejected rows, as in ``rows``
        batch["ref_logps"] = _shifted(rows, ref, input_ids.shape[1], "reference log-probs")
    batch["num_response_tokens"] = int((labels[:b] != IGNORE_INDEX).sum())
    return batch


def batches(num_examples: int, batch_size: int, *, seed: int, epoch: int = 0,
            shuffle: bool = True) -> list[list[int]]:
    """The batches of one epoch as index lists: a permutation seeded by ``seed + epoch``, drop_last=True.

    Deterministic across runs, machines and resumes (a ``torch.Generator``, not the global RNG).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples < batch_size:
        raise DataError(f"{num_examples} examples, fewer than one batch of {batch_size} (the last partial "
                        "batch is dropped, so nothing would be trained)")
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
    else:
        order = list(range(num_examples))
    full = num_examples // batch_size * batch_size
    return [order[i : i + batch_size] for i in range(0, full, batch_size)]
