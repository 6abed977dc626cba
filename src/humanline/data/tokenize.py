"""Canonical rows -> token ids: chat template, one BOS, EOS-terminated completions, truncation.

Prompts: a string is encoded as ``tokenizer(prompt)`` would (BOS when the tokenizer adds one); a message
list goes through ``apply_chat_template(..., add_generation_prompt=True)``. Either way we encode without
special tokens and then add the tokenizer's BOS only if it is not already first, so a template that writes
its own BOS never gets a second one, and no tokenizer-appended EOS ends up inside a prompt.

Completions (a string, or one assistant message: its content) are encoded without special tokens and end
with EOS, added unless already last (TRL's approach; it matches templates that close a turn with EOS).

Labels are built from positions, never from the pad id, so a tokenizer whose pad token is EOS keeps the
completion's EOS as a label (see collate.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from humanline.errors import ConfigError

from .validation import LINE_COLUMN, ROW_COLUMN, located

OBJECTIVE_FIELDS = {
    "sft": ("prompt_ids", "completion_ids"),
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "kto": ("prompt_ids", "completion_ids", "label"),
    "grpo": ("prompt_ids", "completion_ids", "advantage"),  # plus old_logps when the row has them
}


@dataclass
class TokenizeStats:
    """Counts from :func:`tokenize_dataset`; a row counts as truncated if any of its parts was cut."""

    rows: int = 0
    truncated_rows: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0


def _input_ids(encoded: Any) -> Any:
    # transformers returns a BatchEncoding (dict-like) or, for some calls and versions, plain lists.
    return encoded["input_ids"] if isinstance(encoded, Mapping) or hasattr(encoded, "keys") else encoded


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    ids = _input_ids(tokenizer(texts, add_special_tokens=False, return_attention_mask=False))
    return [list(map(int, row)) for row in ids]


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer(text)`` puts BOS in front (Llama and Gemma do; Qwen and the tiny tokenizer not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = _input_ids(tokenizer("a", add_special_tokens=True))
    plain = _input_ids(tokenizer("a", add_special_tokens=False))
    return len(with_special) > len(plain) and int(with_special[0]) == bos


def _clean(messages: Sequence[Mapping]) -> list[dict]:
    # Arrow fills keys missing from a message with None ({"name": None}); templates that test
    # `message.name is defined` would then misfire, so drop them.
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def render_prompt(tokenizer: Any, messages: Sequence[Mapping]) -> str:
    """The chat template applied to ``messages`` with the generation prompt, as text."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ConfigError("the data is conversational but the tokenizer has no chat template; set "
                          "tokenizer.chat_template or use string prompts", key="tokenizer")
    return tokenizer.apply_chat_template(_clean(messages), add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer: Any, prompts: Sequence[Any]) -> list[list[int]]:
    """Token ids of many prompts (strings or message lists), batched; see :func:`encode_prompt`."""
    texts = [p if isinstance(p, str) else render_prompt(tokenizer, p) for p in prompts]
    encoded = _encode_texts(tokenizer, texts)
    bos = tokenizer.bos_token_id
    if adds_bos(tokenizer):
        encoded = [ids if ids and ids[0] == bos else [bos, *ids] for ids in encoded]
    return encoded


def encode_prompt(tokenizer: Any, prompt: str | Sequence[Mapping]) -> list[int]:
    """Token ids of a prompt: a string as ``tokenizer(prompt)``, messages through the chat template (with
    the generation prompt); exactly one BOS when the tokenizer or template uses one."""
    return encode_prompts(tokenizer, [prompt])[0]


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    message = completion if isinstance(completion, Mapping) else completion[-1]
    return message["content"]


def encode_completions(tokenizer: Any, completions: Sequence[Any]) -> list[list[int]]:
    """Token ids of many completions, each ending with EOS; see :func:`encode_completion`."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("the tokenizer has no eos_token: completions need one to end on", key="tokenizer")
    encoded = _encode_texts(tokenizer, [_completion_text(c) for c in completions])
    return [ids if ids and ids[-1] == eos else [*ids, eos] for ids in encoded]


def encode_completion(tokenizer: Any, completion: str | Mapping | Sequence[Mapping]) -> list[int]:
    """Ids of a completion (a string, or one assistant message: its content) + EOS unless already last."""
    return encode_completions(tokenizer, [completion])[0]


def truncate_prompt(ids: list[int], limit: int, bos: int | None) -> list[int]:
    """Keep the last ``limit`` tokens (the end of a prompt matters most) and a leading BOS if any."""
    if len(ids) <= limit:
        return ids
    if bos is not None and ids[0] == bos and limit > 1:
        return [bos, *ids[len(ids) - limit + 1:]]
    return ids[len(ids) - limit:]


def tokenize_dataset(dataset: Dataset | Sequence[Mapping], tokenizer: Any, objective: str, *,
                     max_prompt_length: int, max_length: int, source: str | None = None
                     ) -> tuple[list[dict[str, Any]], TokenizeStats]:
    """Tokenised examples (docs/DESIGN.md fields) of canonical rows (from ``to_objective_rows``).

    The prompt is cut from the left to ``max_prompt_length`` (keeping BOS), then each completion from the
    right so that prompt + completion <= ``max_length``; a cut completion loses its EOS, so the model is
    not taught to stop where the data set was merely truncated. GRPO ``old_logps`` are cut alongside.
    """
    if objective not in OBJECTIVE_FIELDS:
        raise ConfigError(f"unknown objective '{objective}' (expected one of {', '.join(OBJECTIVE_FIELDS)})")
    if not 0 < max_prompt_length < max_length:
        raise ConfigError(f"need 0 < max_prompt_length < max_length so that every completion keeps a token, "
                          f"got max_prompt_length={max_prompt_length}, max_length={max_length}",
                          key="data.max_prompt_length")
    rows = dataset.to_list() if isinstance(dataset, Dataset) else [dict(r) for r in dataset]
    source = source or "data set"
    bos = tokenizer.bos_token_id
    prompts = encode_prompts(tokenizer, [r["prompt"] for r in rows])
    sides = ("chosen", "rejected") if objective == "dpo" else ("completion",)
    completions = {side: encode_completions(tokenizer, [r[side] for r in rows]) for side in sides}

    stats = TokenizeStats(rows=len(rows))
    examples: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        where = {"source": source, "row": row.get(ROW_COLUMN, i), "line": row.get(LINE_COLUMN)}
        prompt = truncate_prompt(prompts[i], max_prompt_length, bos)
        if not prompt:
            raise located("the prompt encodes to no tokens", field="prompt", **where)
        room = max_length - len(prompt)
        example: dict[str, Any] = {"prompt_ids": prompt}
        cut_prompt, cut_completion = len(prompt) < len(prompts[i]), False
        for side in sides:
            ids = completions[side][i]
            cut_completion |= len(ids) > room
            example["completion_ids" if side == "completion" else f"{side}_ids"] = ids[:room]
        if objective == "kto":
            example["label"] = bool(row["label"])
        elif objective == "grpo":
            example["advantage"] = float(row["advantage"])
            old = row.get("old_logps")
            if old is not None:
                full = len(completions["completion"][i])
                if len(old) != full:
                    raise located(f"old_logps has {len(old)} values but the completion encodes to "
                                  f"{full} tokens (EOS included); they must be the behaviour policy's "
                                  "log-probs of exactly these tokens", field="old_logps", **where)
                example["old_logps"] = [float(v) for v in old[:room]]
        stats.truncated_prompts += cut_prompt
        stats.truncated_completions += cut_completion
        stats.truncated_rows += cut_prompt or cut_completion
        examples.append(example)
    return examples, stats
