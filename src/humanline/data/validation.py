"""Checks run before any training step.

Every problem becomes one :class:`DataError` line naming the source (file or data set name), where the
row is (``line 17`` for JSONL files, which carry their line numbers; ``row 3``, 0-based, otherwise) and
the field, e.g. ``data.jsonl, line 17, field 'label': must be a boolean (true/false), got str 'yes'``.

This module is the bottom layer of ``data/``: the row checks, the column mapping, format detection, the
implicit-prompt split and GRPO group keys live here so that ``formats.py`` can reuse them.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

from datasets import Dataset

from humanline.errors import DataError

OBJECTIVES = ("sft", "dpo", "kto", "grpo")

# Hidden bookkeeping columns. ``load_rows`` adds LINE_COLUMN (1-based line) for JSONL files; the
# conversions in formats.py add ROW_COLUMN (the original 0-based row) so later errors still point home.
LINE_COLUMN = "__line__"
ROW_COLUMN = "__row__"

# The names a ``columns`` mapping may rename: {canonical name: the user's column name}.
CANONICAL_COLUMNS = ("prompt", "completion", "chosen", "rejected", "label", "score", "prompt_id",
                     "messages", "old_logps")

# Format kinds returned by detect_format / validate.
MESSAGES = "messages"                # SFT: a conversation whose last message is the assistant's
PROMPT_COMPLETION = "prompt_completion"  # SFT
PREFERENCE = "preference"            # prompt / chosen / rejected
IMPLICIT_PREFERENCE = "implicit_preference"  # chosen / rejected sharing their prompt as a prefix
UNPAIRED = "unpaired"                # KTO: prompt / completion / label
SCORED = "scored"                    # GRPO: prompt / completion / score, grouped by prompt


class RowProblem(Exception):
    """Raised by the value checks; the caller adds source and row. ``field`` may name a sub-field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field


def one_line(text: object, limit: int = 200) -> str:
    """Collapse whitespace (third-party messages can span lines) and cap the length."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def show(value: object) -> str:
    """A short, single-line rendering of a bad value with its type, for error messages."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def located(message: str, *, source: str | None, row: int | None, line: int | None = None,
            field: str | None = None) -> DataError:
    """A DataError pointing at ``line`` (1-based, in the file) when known, else at ``row`` (0-based)."""
    message = one_line(message, limit=400)
    if line is None:
        return DataError(message, source=source, row=row, field=field)
    # DataError only knows rows; build the "line N" text here but keep the attributes structured.
    parts = [source, f"line {line}", f"field '{field}'" if field else None]
    err = DataError(", ".join(p for p in parts if p) + ": " + message)
    err.source, err.row, err.field = source, row, field
    err.line = line  # type: ignore[attr-defined]
    return err


def resolve_columns(columns: Mapping[str, str] | None, *, source: str | None = None) -> dict[str, str]:
    """The full {canonical: actual} column mapping, identity where ``columns`` does not rename."""
    mapping = {name: name for name in CANONICAL_COLUMNS}
    for key, value in (columns or {}).items():
        if key not in mapping:
            raise DataError(f"columns mapping: unknown name '{key}' (known: {', '.join(CANONICAL_COLUMNS)})",
                            source=source)
        if not isinstance(value, str) or not value:
            raise DataError(f"columns mapping: '{key}' must map to a column name, got {show(value)}",
                            source=source)
        mapping[key] = value
    return mapping


def _detect(names: Iterable[str], objective: str, cols: Mapping[str, str]) -> tuple[str, list[str]]:
    """(format kind, canonical names of the missing columns); missing is empty when the kind fits."""
    have = {canon for canon, actual in cols.items() if actual in set(names)}

    def need(kind: str, *required: str) -> tuple[str, list[str]]:
        return kind, [r for r in required if r not in have]

    if objective == "sft":
        if "messages" in have:
            return MESSAGES, []
        if "prompt" in have or "completion" in have:
            return need(PROMPT_COMPLETION, "prompt", "completion")
        return MESSAGES, ["messages"]
    if objective == "dpo":
        return need(PREFERENCE if "prompt" in have else IMPLICIT_PREFERENCE, "chosen", "rejected")
    if objective == "kto":
        if "label" not in have and {"chosen", "rejected"} <= have:
            return PREFERENCE if "prompt" in have else IMPLICIT_PREFERENCE, []
        return need(UNPAIRED, "prompt", "completion", "label")
    if objective == "grpo":
        return need(SCORED, "prompt", "completion", "score")
    raise DataError(f"unknown objective '{objective}' (expected one of {', '.join(OBJECTIVES)})")


def detect_format(column_names: Iterable[str], objective: str,
                  columns: Mapping[str, str] | None = None) -> str:
    """Which TRL format the columns hold for ``objective`` (the kind constants); DataError if none fits."""
    cols = resolve_columns(columns)
    names = list(column_names)
    kind, missing = _detect(names, objective, cols)
    if missing:
        raise DataError(_missing_message(kind, names, cols), field=cols[missing[0]])
    return kind


def _missing_message(kind: str, names: Sequence[str], cols: Mapping[str, str]) -> str:
    wants = {
        MESSAGES: "SFT needs a 'messages' column, or 'prompt' and 'completion' columns",
        PROMPT_COMPLETION: "SFT with prompts needs 'prompt' and 'completion' columns",
        PREFERENCE: "DPO needs 'chosen' and 'rejected' columns (and usually 'prompt')",
        IMPLICIT_PREFERENCE: "DPO needs 'chosen' and 'rejected' columns (and usually 'prompt')",
        UNPAIRED: "KTO needs 'prompt', 'completion' and 'label' columns (or paired 'chosen'/'rejected')",
        SCORED: "GRPO needs 'prompt', 'completion' and 'score' columns",
    }[kind]
    renamed = {k: v for k, v in cols.items() if k != v}
    mapping = f"; columns mapping {renamed}" if renamed else "; rename yours with columns={'prompt': ...}"
    present = [n for n in names if n not in (LINE_COLUMN, ROW_COLUMN)]
    return f"missing column: {wants} (found: {', '.join(present) or 'none'}){mapping}"


# --- value checks: each returns the value (normalised where useful) or raises RowProblem ---------------

def check_text(value: Any, what: str) -> str:
    if value is None:
        raise RowProblem(f"{what} is missing (null)")
    if not isinstance(value, str):
        raise RowProblem(f"{what} must be a string, got {show(value)}")
    if not value.strip():
        raise RowProblem(f"empty {what} ({'whitespace only' if value else 'empty string'})")
    return value


def check_messages(value: Any, what: str) -> list[dict]:
    """A non-empty list of {"role": str, "content": str} dicts (extra keys pass through)."""
    if value is None:
        raise RowProblem(f"{what} is missing (null)")
    if not isinstance(value, list):
        raise RowProblem(f"{what} must be a list of {{'role', 'content'}} messages, got {show(value)}")
    if not value:
        raise RowProblem(f"{what} is an empty list of messages")
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowProblem(f"message {i} must be a {{'role', 'content'}} dict, got {show(message)}",
                             f"[{i}]")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RowProblem(f"message {i} needs a 'role' string, got {show(role)}", f"[{i}].role")
        if not isinstance(content, str):
            raise RowProblem(f"message {i} needs a 'content' string, got {show(content)}", f"[{i}].content")
    return value


def check_prompt(value: Any) -> Any:
    """A non-blank string, or a non-empty list of messages (conversational)."""
    if isinstance(value, list):
        return check_messages(value, "prompt")
    return check_text(value, "prompt")


def check_completion(value: Any, what: str = "completion") -> Any:
    """A non-blank string, or one assistant message (a dict, or TRL's list holding one message)."""
    if isinstance(value, Mapping):
        value = [value]
        where = ""
    else:
        where = "[0]"
    if isinstance(value, list):
        check_messages(value, what)
        if len(value) != 1:
            raise RowProblem(f"{what} must hold exactly one assistant message, got {len(value)} messages")
        if value[0]["role"] != "assistant":
            raise RowProblem(f"{what} message must have role 'assistant', got {value[0]['role']!r}",
                             f"{where}.role")
        try:
            check_text(value[0]["content"], what)
        except RowProblem as problem:
            raise RowProblem(problem.message, f"{where}.content") from None
        return value
    return check_text(value, what)


def check_label(value: Any) -> bool:
    if value is None:
        raise RowProblem("label is missing (null)")
    if isinstance(value, bool):
        return value
    hint = " (0/1 are not accepted: TRL's KTO format uses booleans)" if isinstance(value, int) else ""
    raise RowProblem(f"label must be a boolean (true = desirable, false = undesirable), "
                     f"got {show(value)}{hint}")


def check_score(value: Any) -> float:
    if value is None:
        raise RowProblem("score is missing (null)")
    if isinstance(value, bool) or not isinstance(value, Real):
        raise RowProblem(f"score must be a number, got {show(value)}")
    if not math.isfinite(value):
        raise RowProblem(f"score must be a finite number, got {value}")
    return float(value)


def check_prompt_id(value: Any) -> Any:
    if value is None:
        raise RowProblem("prompt_id is missing (null)")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowProblem(f"prompt_id must be a string or an integer, got {show(value)}")
    return value


def check_logps(value: Any) -> list[float] | None:
    """Optional behaviour-policy log-probs: null, or a list of finite numbers <= 0."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise RowProblem(f"old_logps must be a list of numbers, got {show(value)}")
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise RowProblem(f"old_logps[{i}] must be a finite number, got {show(v)}")
        if v > 1e-6:  # probabilities or rewards passed by mistake are the usual cause
            raise RowProblem(f"old_logps[{i}] = {v} is positive; log-probs must be <= 0")
    return [float(v) for v in value]


def check_conversation(value: Any) -> list[dict]:
    """SFT ``messages``: at least one prompt message, then an assistant message with non-blank content."""
    check_messages(value, "messages")
    if len(value) < 2:
        raise RowProblem("messages needs at least 2 messages (a prompt, then the assistant's reply)")
    last = len(value) - 1
    if value[last]["role"] != "assistant":
        raise RowProblem(f"the last message must have role 'assistant' (it is the completion), "
                         f"got {value[last]['role']!r}", f"[{last}].role")
    try:
        check_text(value[last]["content"], "completion (last message)")
    except RowProblem as problem:
        raise RowProblem(problem.message, f"[{last}].content") from None
    return value


def extract_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split TRL's implicit-prompt pair into (prompt, chosen, rejected) at their longest shared prefix.

    Conversations split at the first differing message (the rest must be one assistant message each);
    strings split at the first differing character, backing off before a space as TRL does.
    """
    if isinstance(chosen, list) and isinstance(rejected, list):
        check_messages(chosen, "chosen")
        check_messages(rejected, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and _same_message(chosen[n], rejected[n]):
            n += 1
        if n == 0:
            raise RowProblem("chosen and rejected share no prompt messages; add a 'prompt' column")
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        if chosen == rejected:
            raise RowProblem("chosen and rejected are identical")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if n > 0 and chosen[n - 1] == " ":
            n -= 1
        if not chosen[:n].strip():
            raise RowProblem("chosen and rejected share no prompt prefix; add a 'prompt' column")
        return chosen[:n], chosen[n:], rejected[n:]
    raise RowProblem(f"chosen and rejected must both be strings or both be message lists, "
                     f"got {type(chosen).__name__} and {type(rejected).__name__}")


def prompt_in_conversation(prompt: Any, chosen: Any, rejected: Any) -> bool:
    """TRL's rule for a string ``prompt`` column beside whole conversations (e.g.
    princeton-nlp/llama3-ultrafeedback-armorm): when ``chosen`` / ``rejected`` are message lists holding more
    than the assistant's reply, the prompt is their shared prefix (``extract_prompt``) and the string column is
    not used, as in TRL's ``maybe_extract_prompt`` (which does not compare the two either: the column may be a
    plain-text rendering of a multi-turn prefix, so a mismatch is not an error)."""
    return (isinstance(prompt, str) and isinstance(chosen, list) and isinstance(rejected, list)
            and max(len(chosen), len(rejected)) > 1)


def _same_message(a: Mapping, b: Mapping) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def group_key(prompt: Any, prompt_id: Any = None) -> Any:
    """The GRPO group a row belongs to: its ``prompt_id`` if given, else the prompt itself."""
    if prompt_id is not None:
        return ("id", prompt_id)
    if isinstance(prompt, str):
        return ("text", prompt)
    # Conversational prompts are lists of dicts (unhashable): compare role and content only.
    return ("messages", json.dumps([[m.get("role"), m.get("content")] for m in prompt], ensure_ascii=False))


def iter_rows(dataset: Dataset | Sequence[Mapping], names: Sequence[str]
              ) -> Iterator[tuple[int, int | None, int, dict]]:
    """Yield (index, line, original row, {name: value}) for the given columns, in batches for speed."""
    names = list(dict.fromkeys(names))
    if isinstance(dataset, Dataset):
        have = set(dataset.column_names)
        wanted = [n for n in (*names, LINE_COLUMN, ROW_COLUMN) if n in have]
        if not wanted:
            yield from ((i, None, i, {}) for i in range(len(dataset)))
            return
        index = 0
        for batch in dataset.select_columns(wanted).iter(batch_size=1024):
            for j in range(len(batch[wanted[0]])):
                row = {n: batch[n][j] for n in wanted}
                yield index, row.get(LINE_COLUMN), row.get(ROW_COLUMN, index), row
                index += 1
    else:
        for index, row in enumerate(dataset):
            yield index, row.get(LINE_COLUMN), row.get(ROW_COLUMN, index), dict(row)


def column_names(dataset: Dataset | Sequence[Mapping]) -> list[str]:
    if isinstance(dataset, Dataset):
        return list(dataset.column_names)
    names: dict[str, None] = {}
    for row in dataset:
        names.update(dict.fromkeys(row))
    return list(names)


def validate_rows(dataset: Dataset | Sequence[Mapping], objective: str, *, source: str | None = None,
                  columns: Mapping[str, str] | None = None) -> str:
    """Check every row for ``objective`` and return the detected format kind.

    Raises one-line DataErrors for: an empty data set, missing or mistyped columns, null or empty
    (whitespace) prompts and completions, malformed messages, non-boolean labels, non-numeric or NaN
    scores, bad ``old_logps`` and GRPO groups of a single completion.
    """
    source = source or "data set"
    if objective not in OBJECTIVES:
        raise DataError(f"unknown objective '{objective}' (expected one of {', '.join(OBJECTIVES)})",
                        source=source)
    cols = resolve_columns(columns, source=source)
    names = column_names(dataset)
    if len(dataset) == 0:
        raise DataError("no rows: the data set is empty", source=source)
    kind, missing = _detect(names, objective, cols)
    if missing:
        _, line, row, _ = next(iter_rows(dataset, [LINE_COLUMN]))
        raise located(_missing_message(kind, names, cols), source=source, row=row, line=line,
                      field=cols[missing[0]])

    checks = _checks_for(kind, objective, names, cols)
    groups: Counter = Counter()
    first_of_group: dict[Any, tuple[int, int | None]] = {}
    needed = [cols[c] for c in checks]
    if kind == IMPLICIT_PREFERENCE:
        needed += [cols["chosen"], cols["rejected"]]
    first_form: dict[bool, tuple[int, int | None]] = {}  # PREFERENCE: was the prompt split off the pair?
    for _, line, row, values in iter_rows(dataset, needed):
        implicit = kind == IMPLICIT_PREFERENCE
        if kind == PREFERENCE:
            implicit = prompt_in_conversation(*(values.get(cols[c]) for c in ("prompt", "chosen", "rejected")))
            first_form.setdefault(implicit, (row, line))
            if len(first_form) == 2:
                other = first_form[not implicit][0]
                raise located(f"chosen / rejected {'hold' if implicit else 'do not hold'} the prompt turns here "
                              f"but {'do not' if implicit else 'do'} in row {other}; use one form for the whole "
                              "data set", source=source, row=row, line=line, field=cols["chosen"])
        for canon, check in checks.items():
            if implicit:
                break  # extract_prompt below checks both sides; the prompt column is not used
            field = cols[canon]
            try:
                check(values.get(field))
            except RowProblem as problem:
                if canon == "label" and _boolean_text(values.get(field)):
                    raise _label_column_as_text(dataset, field, source) from None
                raise located(problem.message, source=source, row=row, line=line,
                              field=field + (problem.field or "")) from None
        if implicit:
            try:
                _, chosen, rejected = extract_prompt(values[cols["chosen"]], values[cols["rejected"]])
                if isinstance(chosen, list):
                    check_completion(chosen, "chosen (after the shared prompt)")
                    check_completion(rejected, "rejected (after the shared prompt)")
                else:
                    check_text(chosen, "chosen (after the shared prompt)")
                    check_text(rejected, "rejected (after the shared prompt)")
            except RowProblem as problem:
                raise located(problem.message, source=source, row=row, line=line,
                              field=cols["chosen"]) from None
        if kind == SCORED:
            key = group_key(values[cols["prompt"]], values.get(cols["prompt_id"]))
            groups[key] += 1
            first_of_group.setdefault(key, (row, line))

    for key, size in groups.items():
        if size < 2:
            row, line = first_of_group[key]
            by_id = key[0] == "id"
            how = "" if by_id else (" (rows are grouped by identical prompt; add a 'prompt_id' column "
                                    "to group otherwise)")
            raise located("GRPO group of size 1: this prompt has a single completion, and advantages need "
                          "at least 2 per group" + how, source=source, row=row, line=line,
                          field=cols["prompt_id" if by_id else "prompt"])
    return kind


validate = validate_rows  # the short name


def _boolean_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("true", "false")


def _label_column_as_text(dataset: Dataset | Sequence[Mapping], field: str, source: str) -> DataError:
    """A label 'true' as text usually means another row's label made a CSV reader keep the column as
    text: point at that row rather than at the innocent first one."""
    first = None
    for _, line, row, values in iter_rows(dataset, [field]):
        value = values.get(field)
        if not _boolean_text(value):
            return located(f"label must be a boolean (true/false), got {show(value)} (because of it, the "
                           "whole column was read as text)", source=source, row=row, line=line, field=field)
        first = first or (row, line, value)
    row, line, value = first  # every label is the text "true"/"false": quoted in the file
    return located(f"label must be a boolean, got the text {value!r}: write it unquoted (true/false)",
                   source=source, row=row, line=line, field=field)


def _checks_for(kind: str, objective: str, names: Sequence[str], cols: Mapping[str, str]) -> dict:
    """{canonical column: check} for a format kind; optional columns are checked only when present."""
    if kind == MESSAGES:
        return {"messages": check_conversation}
    if kind == PROMPT_COMPLETION:
        return {"prompt": check_prompt, "completion": check_completion}
    if kind == PREFERENCE:
        return {"prompt": check_prompt, "chosen": lambda v: check_completion(v, "chosen"),
                "rejected": lambda v: check_completion(v, "rejected")}
    if kind == IMPLICIT_PREFERENCE:
        return {}  # extract_prompt checks both sides
    if kind == UNPAIRED:
        return {"prompt": check_prompt, "completion": check_completion, "label": check_label}
    checks = {"prompt": check_prompt, "completion": check_completion, "score": check_score}
    if cols["prompt_id"] in names:
        checks["prompt_id"] = check_prompt_id
    if cols["old_logps"] in names:
        checks["old_logps"] = check_logps
    return checks
