"""TRL data formats and the conversions to what each objective trains on.

Accepted (each standard, with strings, or conversational, with lists of ``{"role", "content"}`` messages):

=========  ==========================================================================================
``sft``    ``messages`` (prompt = all messages but the last, which must be the assistant's), or
           ``prompt`` / ``completion``
``dpo``    ``prompt`` / ``chosen`` / ``rejected``, or TRL's implicit prompt: ``chosen`` / ``rejected``
           only, the prompt being their shared prefix; also when a string ``prompt`` column sits beside
           whole conversations (more than the assistant turn), as TRL does: the prefix is the prompt
``kto``    ``prompt`` / ``completion`` / ``label`` (bool), or a paired set (as for DPO) giving one
           desirable and one undesirable row per pair
``grpo``   ``prompt`` / ``completion`` / ``score``, grouped by prompt or by a ``prompt_id`` column; an
           optional ``old_logps`` column (behaviour-policy log-probs, one per completion token)
=========  ==========================================================================================

Column names are configurable: ``columns={"prompt": "question", "completion": "answer"}``.
The canonical rows hold ``prompt`` plus ``completion`` (sft, kto: ``label``; grpo: ``score``,
``advantage``, ``prompt_id`` and ``old_logps`` when given) or ``chosen`` / ``rejected`` (dpo), and the hidden
``__row__`` (and ``__line__`` for JSONL files) so that later errors still name the original row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from datasets import Dataset

from humanline.errors import DataError
from humanline.losses import group_advantages

from .validation import (
    IMPLICIT_PREFERENCE,
    LINE_COLUMN,
    MESSAGES,
    PREFERENCE,
    PROMPT_COMPLETION,
    ROW_COLUMN,
    SCORED,
    UNPAIRED,
    column_names,
    detect_format,
    extract_prompt,
    group_key,
    iter_rows,
    prompt_in_conversation,
    resolve_columns,
    validate_rows,
)

__all__ = ["detect_format", "extract_prompt", "is_conversational", "preference_to_unpaired",
           "to_objective_rows"]


def is_conversational(value: Any) -> bool:
    """True for a message list (or one message dict): TRL's conversational format."""
    return isinstance(value, Mapping) or (isinstance(value, list) and bool(value)
                                          and all(isinstance(m, Mapping) for m in value))


def to_objective_rows(dataset: Dataset | Sequence[Mapping], objective: str, *,
                      columns: Mapping[str, str] | None = None, source: str | None = None) -> Dataset:
    """Validate ``dataset`` (one-line DataErrors) and convert it to the canonical rows of ``objective``."""
    kind = validate_rows(dataset, objective, source=source, columns=columns)
    cols = resolve_columns(columns)
    names = column_names(dataset)
    optional = [cols[c] for c in ("prompt_id", "old_logps") if cols[c] in names]
    wanted = [cols[c] for c in ("prompt", "completion", "chosen", "rejected", "label", "score", "messages")]
    rows: list[dict] = []
    for _, line, row, values in iter_rows(dataset, wanted + optional):
        get = {canon: values.get(cols[canon]) for canon in cols}
        where = {ROW_COLUMN: row} if line is None else {ROW_COLUMN: row, LINE_COLUMN: line}
        if kind == MESSAGES:
            messages = get["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:], **where})
        elif kind in (PROMPT_COMPLETION, UNPAIRED, SCORED):
            out = {"prompt": get["prompt"], "completion": get["completion"]}
            if kind == UNPAIRED:
                out["label"] = get["label"]
            if kind == SCORED:
                out["score"] = float(get["score"])
                for canon in ("prompt_id", "old_logps"):
                    if cols[canon] in names:
                        out[canon] = get[canon]
            rows.append({**out, **where})
        else:  # PREFERENCE or IMPLICIT_PREFERENCE
            if kind == IMPLICIT_PREFERENCE or prompt_in_conversation(get["prompt"], get["chosen"], get["rejected"]):
                prompt, chosen, rejected = extract_prompt(get["chosen"], get["rejected"])
            else:
                prompt, chosen, rejected = get["prompt"], get["chosen"], get["rejected"]
            if objective == "dpo":
                rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, **where})
            else:
                rows.extend(preference_to_unpaired([{"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                                     **where}]))
    if kind == SCORED:
        _add_advantages(rows)
    if not rows:
        raise DataError("no rows after conversion", source=source)
    return Dataset.from_list(rows)


def preference_to_unpaired(rows: Sequence[Mapping]) -> list[dict]:
    """KTO rows from pairs: each pair gives its chosen (label True) then its rejected (label False)."""
    out = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True, **extra})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False, **extra})
    return out


def _add_advantages(rows: list[dict]) -> None:
    """GRPO advantages per group, (s - mean) / (population std + 1e-4), from losses.group_advantages."""
    ids: dict[Any, int] = {}
    group = [ids.setdefault(group_key(r["prompt"], r.get("prompt_id")), len(ids)) for r in rows]
    # float64 so that large scores do not lose the small differences the advantages are made of
    scores = torch.tensor([r["score"] for r in rows], dtype=torch.float64)
    advantages = group_advantages(scores, torch.tensor(group), scale=True, eps=1e-4)
    for row, adv in zip(rows, advantages.tolist()):
        row["advantage"] = adv


# The format kind names, for callers that branch on ``detect_format``.
KINDS = (MESSAGES, PROMPT_COMPLETION, PREFERENCE, IMPLICIT_PREFERENCE, UNPAIRED, SCORED)
