"""Data: load, validate (one-line errors), convert TRL formats, tokenise, collate.

The whole path in one call::

    examples, stats = prepare("data.jsonl", "dpo", tokenizer, max_prompt_length=512, max_length=1024)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .collate import IGNORE_INDEX, batches, collate
from .formats import (
    detect_format,
    extract_prompt,
    is_conversational,
    preference_to_unpaired,
    to_objective_rows,
)
from .loading import Source, load_rows, rows_to_dataset, source_label
from .tokenize import (
    TokenizeStats,
    adds_bos,
    encode_completion,
    encode_completions,
    encode_prompt,
    encode_prompts,
    render_prompt,
    tokenize_dataset,
)
from .validation import LINE_COLUMN, OBJECTIVES, ROW_COLUMN, validate, validate_rows

__all__ = [
    "IGNORE_INDEX", "LINE_COLUMN", "OBJECTIVES", "ROW_COLUMN", "Source", "TokenizeStats", "adds_bos",
    "batches", "collate", "detect_format", "encode_completion", "encode_completions", "encode_prompt",
    "encode_prompts", "extract_prompt", "is_conversational", "load_rows", "prepare", "preference_to_unpaired",
    "render_prompt", "rows_to_dataset", "source_label", "to_objective_rows", "tokenize_dataset", "validate",
    "validate_rows",
]


def prepare(source: Source, objective: str, tokenizer: Any, *, max_prompt_length: int, max_length: int,
            columns: Mapping[str, str] | None = None, split: str = "train", name: str | None = None
            ) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Load ``source``, validate and convert it for ``objective``, and tokenise it."""
    label = source_label(source)
    rows = load_rows(source, split=split, name=name)
    rows = to_objective_rows(rows, objective, columns=columns, source=label)
    return tokenize_dataset(rows, tokenizer, objective, max_prompt_length=max_prompt_length,
                            max_length=max_length, source=label)
