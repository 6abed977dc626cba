"""Rows from files, hub names, lists of dicts or in-memory ``datasets.Dataset`` objects.

JSON and JSONL are parsed here (strict UTF-8, line by line for JSONL) so that a broken line is reported
as ``data.jsonl, line 17: ...``; JSONL rows keep their line number in the hidden ``__line__`` column so
that validation errors point at file lines too. Parquet and CSV go through pyarrow. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets import Dataset, DatasetDict
from datasets.table import InMemoryTable

from humanline.errors import DataError

from .validation import LINE_COLUMN, located, one_line

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# What a failed Arrow conversion can raise (mixed types in a column, unsupported objects).
_ARROW_ERRORS = (pa.ArrowException, TypeError, ValueError, OverflowError)

Source = Dataset | DatasetDict | Sequence[Mapping[str, Any]] | str | os.PathLike


def source_label(source: object) -> str:
    """How errors name a source: the path or hub name, else a description of the in-memory object."""
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (Dataset, DatasetDict)):
        name = getattr(source, "info", None) and source.info.dataset_name
        return f"data set '{name}'" if name else "in-memory data set"
    return "list of rows"


def load_rows(source: Source, *, split: str = "train", name: str | None = None) -> Dataset:
    """Load ``source`` as a ``datasets.Dataset``; any problem is a one-line DataError.

    ``source``: a ``Dataset`` (or ``DatasetDict``, from which ``split`` is taken), a list of dicts, a local
    ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file (by extension), a folder written by
    ``Dataset.save_to_disk``, or a Hugging Face hub data set name (``name`` is its config).
    """
    label = source_label(source)
    if isinstance(source, DatasetDict):
        dataset = _pick_split(source, split, label)
    elif isinstance(source, Dataset):
        dataset = source
    elif isinstance(source, (str, os.PathLike)):
        dataset = _load_path_or_hub(os.fspath(source), split=split, name=name, label=label)
    elif isinstance(source, Sequence):
        for i, row in enumerate(source):
            if not isinstance(row, Mapping):
                raise DataError(f"each row must be a dict, got {type(row).__name__}", source=label, row=i)
        dataset = rows_to_dataset([dict(r) for r in source], source=label)
    else:
        raise DataError(f"cannot load rows from a {type(source).__name__}: pass a file path, a hub data set "
                        "name, a list of dicts or a datasets.Dataset")
    if len(dataset) == 0:
        raise DataError("no rows: the data set is empty", source=label)
    return dataset


def rows_to_dataset(rows: list[dict], *, source: str, lines: list[int] | None = None) -> Dataset:
    """Build a Dataset from python rows; a row whose value does not fit its column's type is named."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    # Union of keys in first-seen order; a key absent from a row becomes null (validation reports it).
    table = {n: [row.get(n) for row in rows] for n in names}
    try:
        dataset = Dataset.from_dict(table)
    except _ARROW_ERRORS as exc:
        raise _bad_value(table, exc, source=source, lines=lines) from None
    if lines is not None:
        dataset = dataset.add_column(LINE_COLUMN, lines)
    return dataset


def _bad_value(table: dict[str, list], exc: Exception, *, source: str, lines: list[int] | None) -> DataError:
    """Find the first row whose value Arrow cannot put in its column (e.g. label 'yes' after booleans)."""
    for column, values in table.items():
        if _fits(column, values):
            continue
        lo, hi = 1, len(values)  # the shortest failing prefix ends at the offending row
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if not _fits(column, values[:mid]) else (mid + 1, hi)
        row = lo - 1
        why = ("does not match the type of the rows before it" if _fits(column, values[row:lo])
               else "mixes types that a table column cannot hold")
        return located(f"value {one_line(repr(values[row]), 60)} {why} ({one_line(exc, 120)})", source=source,
                       row=row,
                       line=lines[row] if lines else None, field=column)
    return DataError(f"cannot build a table from the rows: {one_line(exc)}", source=source)


def _fits(column: str, values: list) -> bool:
    try:
        Dataset.from_dict({column: values})
    except _ARROW_ERRORS:
        return False
    return True


def _pick_split(dataset_dict: DatasetDict, split: str, label: str) -> Dataset:
    if split not in dataset_dict:
        raise DataError(f"no split '{split}' (splits: {', '.join(dataset_dict) or 'none'})", source=label)
    return dataset_dict[split]


def _looks_local(text: str) -> bool:
    """A path the user meant as a file (so 'not found' beats a confusing hub lookup)."""
    return (Path(text).suffix.lower() in FILE_KINDS or text.startswith((".", "/", "~"))
            or (os.sep != "/" and os.sep in text))


def _load_path_or_hub(text: str, *, split: str, name: str | None, label: str) -> Dataset:
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(path))  # Arrow files, no pickle
            return _pick_split(loaded, split, label) if isinstance(loaded, DatasetDict) else loaded
        raise DataError("is a folder: pass a .jsonl, .json, .parquet or .csv file, or a folder written by "
                        "Dataset.save_to_disk", source=label)
    if path.is_file():
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise DataError(f"unsupported file type '{path.suffix}' (expected {', '.join(FILE_KINDS)})",
                            source=label)
        if path.stat().st_size == 0:
            raise DataError("no rows: the file is empty", source=label)
        return {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv}[kind](
            path, label)
    if _looks_local(text):
        raise DataError("file not found", source=label)
    return _load_hub(text, split=split, name=name)


def _load_hub(repo: str, *, split: str, name: str | None) -> Dataset:
    """The real hub path, for users with network access (tests never take it)."""
    try:
        loaded = datasets.load_dataset(repo, name, split=split)
    except Exception as exc:  # network, auth, unknown split: all reach the user as one line
        raise DataError(f"could not load this data set from the Hugging Face hub "
                        f"({type(exc).__name__}: {one_line(exc)})", source=repo) from exc
    if isinstance(loaded, DatasetDict):
        return _pick_split(loaded, split, repo)
    if not isinstance(loaded, Dataset):
        raise DataError(f"expected a Dataset from the hub, got {type(loaded).__name__}", source=repo)
    return loaded


def _decode_line(raw: bytes, *, label: str, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise located(f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                      "re-save the file as UTF-8", source=label, row=None, line=line) from None


def _read_jsonl(path: Path, label: str) -> Dataset:
    rows: list[dict] = []
    lines: list[int] = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a UTF-8 byte-order mark
                raw = raw[3:]
            text = _decode_line(raw, label=label, line=number)
            if not text.strip():
                continue  # blank lines (often a trailing one) carry no row
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise located(f"invalid JSON at column {exc.colno}: {exc.msg}", source=label,
                              row=len(rows), line=number) from None
            if not isinstance(row, dict):
                raise located(f"each line must be a JSON object, got {type(row).__name__}", source=label,
                              row=len(rows), line=number)
            rows.append(row)
            lines.append(number)
    if not rows:
        raise DataError("no rows: the file has no JSON lines", source=label)
    return rows_to_dataset(rows, source=label, lines=lines)


def _read_json(path: Path, label: str) -> Dataset:
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise located(f"not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8",
                      source=label, row=None, line=line) from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several JSON objects one per line: JSONL with a .json name
            return _read_jsonl(path, label)
        raise located(f"invalid JSON at column {exc.colno}: {exc.msg}", source=label, row=None,
                      line=exc.lineno) from None
    if not isinstance(parsed, list):
        raise DataError(f"expected a JSON array of objects, got a top-level {type(parsed).__name__}",
                        source=label)
    for i, row in enumerate(parsed):
        if not isinstance(row, dict):
            raise DataError(f"each array element must be a JSON object, got {type(row).__name__}",
                            source=label, row=i)
    return rows_to_dataset(parsed, source=label)


def _read_parquet(path: Path, label: str) -> Dataset:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read Parquet: {one_line(exc)}", source=label) from None
    return Dataset(InMemoryTable(table))


def _read_csv(path: Path, label: str) -> Dataset:
    import pyarrow.csv as pacsv

    try:
        table = pacsv.read_csv(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"cannot read CSV: {one_line(exc)}", source=label) from None
    return Dataset(InMemoryTable(table))
