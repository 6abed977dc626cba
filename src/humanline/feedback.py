"""Scored samples -> training rows in TRL's formats: GRPO groups, DPO pairs, KTO binary rows.

Every builder takes the rollouts of one sampling round and their scores (aligned lists) and returns
``(rows, stats)``: rows are dicts of plain python values (``datasets.Dataset.from_list`` or `save_jsonl` take
them as they are), stats a dict of numbers for logging.

Row text follows the prompt's format: a text prompt gets text completions; a chat prompt (list of messages)
gets completions as ``[{"role": "assistant", "content": ...}]`` (TRL's conversational format).

Rows also keep the token ids sampled (``prompt_ids`` and ``completion_ids``, or ``chosen_ids`` /
``rejected_ids`` for pairs), so the trainer can skip re-tokenising and train on exactly the tokens that were
sampled, and GRPO rows keep ``old_logps``, the behaviour policy's per-token log-probs of ``completion_ids``
(see rollout/base.py), for the importance ratio. Pass ``keep_ids=False`` for text-only rows.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from humanline.errors import HumanlineError
from humanline.losses import group_advantages
from humanline.rollout.base import Rollout

Row = dict[str, Any]

PAIR_RULES = ("best_worst", "all", "random")
BINARY_RULES = ("pairs", "median", "mean", "value")


def _check(rollouts: Sequence[Rollout], scores: Sequence[float]) -> list[float]:
    if len(rollouts) != len(scores):
        raise HumanlineError(f"{len(rollouts)} rollouts but {len(scores)} scores")
    return [float(s) for s in scores]


def _groups(rollouts: Sequence[Rollout]) -> list[list[int]]:
    """Indices of the rollouts of each prompt, groups in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.group, []).append(i)
    return list(groups.values())


def _completion(rollout: Rollout) -> Any:
    """The completion in the prompt's format (text, or one assistant message for chat prompts)."""
    if isinstance(rollout.prompt, str):
        return rollout.completion
    return [{"role": "assistant", "content": rollout.completion}]


def to_groups(rollouts: Sequence[Rollout], scores: Sequence[float], *, scale: bool = True, eps: float = 1e-4,
              drop_zero_std: bool = False, keep_ids: bool = True) -> tuple[list[Row], dict[str, float]]:
    """GRPO rows ``{prompt, completion, score, prompt_id, advantage}`` (+ ``prompt_ids``, ``completion_ids``,
    ``old_logps`` with ``keep_ids``).

    ``advantage`` is the group-normalised score, (s - mean) / (population std + eps) per prompt
    (`humanline.losses.group_advantages`); ``prompt_id`` is the rollout's group.
    A group whose scores all tie carries no signal: its advantages are 0 and it is counted in
    ``frac_reward_zero_std``; ``drop_zero_std`` leaves its rows out.
    """
    values = _check(rollouts, scores)
    if not rollouts:
        return [], {"groups": 0, "rows": 0, "frac_reward_zero_std": 0.0}
    advantages = group_advantages(torch.tensor(values, dtype=torch.float64),
                                  torch.tensor([r.group for r in rollouts]), scale=scale, eps=eps).tolist()
    groups = _groups(rollouts)
    tied = {i for members in groups if len({values[j] for j in members}) == 1 for i in members}
    rows = []
    for i, r in enumerate(rollouts):
        if drop_zero_std and i in tied:
            continue
        row: Row = {"prompt": r.prompt, "completion": _completion(r), "score": values[i],
                    "prompt_id": r.group, "advantage": 0.0 if i in tied else advantages[i]}
        if keep_ids:
            row.update(prompt_ids=list(r.prompt_ids), completion_ids=list(r.completion_ids),
                       old_logps=list(r.logps))
        rows.append(row)
    zero_std = sum(1 for members in groups if members[0] in tied)
    return rows, {"groups": len(groups), "rows": len(rows), "frac_reward_zero_std": zero_std / len(groups)}


def _pair_indices(members: list[int], values: list[float], rule: str, threshold: float,
                  rng: random.Random) -> list[tuple[int, int]]:
    """(chosen, rejected) rollout indices within one prompt's samples; every gap > threshold."""
    if rule == "best_worst":
        best = max(members, key=lambda i: values[i])  # first of the tied best, first of the tied worst
        worst = min(members, key=lambda i: values[i])
        return [(best, worst)] if values[best] - values[worst] > threshold else []
    if rule == "all":
        return [(i, j) for i in members for j in members if values[i] - values[j] > threshold]
    # random: shuffle, pair neighbours (each sample used once), orient by score, keep clear gaps
    order = list(members)
    rng.shuffle(order)
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        hi, lo = (a, b) if values[a] >= values[b] else (b, a)
        if values[hi] - values[lo] > threshold:
            pairs.append((hi, lo))
    return pairs


def to_pairs(rollouts: Sequence[Rollout], scores: Sequence[float], *, rule: str = "best_worst",
             threshold: float = 0.01, seed: int = 0,
             keep_ids: bool = True) -> tuple[list[Row], dict[str, float]]:
    """DPO rows ``{prompt, chosen, rejected, score_chosen, score_rejected[, prompt_ids, chosen_ids,
    rejected_ids]}``, only for score gaps strictly greater than ``threshold``.

    Rules, per prompt: ``best_worst`` (the authors' rule: best vs worst sample, default gap 0.01); ``all``
    (every ordered pair above the threshold); ``random`` (the samples shuffled with ``seed`` and paired two by
    two, each pair oriented by score). Deterministic given ``seed``. Stats: ``pairs``, ``prompts_skipped``
    (prompts that gave no pair).
    """
    if rule not in PAIR_RULES:
        raise HumanlineError(f"unknown pair rule '{rule}': use one of {', '.join(PAIR_RULES)}")
    values = _check(rollouts, scores)
    rng = random.Random(seed)
    rows, skipped = [], 0
    groups = _groups(rollouts)
    for members in groups:
        pairs = _pair_indices(members, values, rule, threshold, rng)
        skipped += not pairs
        for c, r in pairs:
            chosen, rejected = rollouts[c], rollouts[r]
            row: Row = {"prompt": chosen.prompt, "chosen": _completion(chosen),
                        "rejected": _completion(rejected), "score_chosen": values[c],
                        "score_rejected": values[r]}
            if keep_ids:
                row.update(prompt_ids=list(chosen.prompt_ids), chosen_ids=list(chosen.completion_ids),
                           rejected_ids=list(rejected.completion_ids))
            rows.append(row)
    return rows, {"pairs": len(rows), "prompts": len(groups), "prompts_skipped": skipped}


def to_binary(rollouts: Sequence[Rollout], scores: Sequence[float], *, rule: str = "pairs",
              threshold: float | None = None, keep_ids: bool = True) -> tuple[list[Row], dict[str, float]]:
    """KTO rows ``{prompt, completion, label, score[, prompt_ids, completion_ids]}`` (label True = desirable).

    Rules: ``pairs`` (the authors' rule: each prompt's best/worst pair, gap > ``threshold`` (default 0.01),
    gives one desirable and one undesirable row); ``median`` / ``mean`` (desirable iff score > the median
    / mean of all scores in the round: strictly greater, so ties at the centre are undesirable and a round
    where every score ties gives no desirable row; with 0/1 verifier scores and accuracy above 50% the median
    is 1 and nothing is desirable, so use ``value`` there); ``value`` (desirable iff score >= ``threshold``,
    a pass mark: with 0/1 scores, ``threshold=1`` marks exactly the correct answers).
    """
    if rule not in BINARY_RULES:
        raise HumanlineError(f"unknown binary rule '{rule}': use one of {', '.join(BINARY_RULES)}")
    values = _check(rollouts, scores)
    labelled: list[tuple[int, bool]] = []
    if rule == "pairs":
        rng = random.Random(0)  # unused by best_worst
        for members in _groups(rollouts):
            for c, r in _pair_indices(members, values, "best_worst",
                                      0.01 if threshold is None else threshold, rng):
                labelled += [(c, True), (r, False)]
    else:
        if rule == "value":
            if threshold is None:
                raise HumanlineError("binary rule 'value' needs a threshold "
                                     "(desirable iff score >= threshold)")
            labelled = [(i, v >= threshold) for i, v in enumerate(values)]
        else:
            if threshold is not None:
                raise HumanlineError(f"binary rule '{rule}' computes its own threshold: do not pass one")
            if values:
                centre = statistics.median(values) if rule == "median" else statistics.fmean(values)
                labelled = [(i, v > centre) for i, v in enumerate(values)]
    rows = []
    for i, label in labelled:
        r = rollouts[i]
        row: Row = {"prompt": r.prompt, "completion": _completion(r), "label": bool(label),
                    "score": values[i]}
        if keep_ids:
            row.update(prompt_ids=list(r.prompt_ids), completion_ids=list(r.completion_ids))
        rows.append(row)
    desirable = sum(row["label"] for row in rows)
    return rows, {"rows": len(rows), "desirable": desirable, "undesirable": len(rows) - desirable,
                  "frac_desirable": desirable / len(rows) if rows else 0.0}


def save_jsonl(rows: Iterable[Row], path: str | os.PathLike) -> str:
    """Write rows as JSON lines, atomically (a temporary file in the same folder, then ``os.replace``): a
    crash never leaves a half-written file. Values must be JSON (no NaN); returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                try:
                    line = json.dumps(row, ensure_ascii=False, allow_nan=False)
                except (TypeError, ValueError) as err:
                    raise HumanlineError(f"{path}: row {i} is not JSON: {err}") from err
                f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
