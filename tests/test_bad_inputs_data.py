"""A corpus of bad data sets: each gives one DataError line naming the file, the line or row, the field."""

from __future__ import annotations

import json

import pytest

from humanline.data import load_rows, to_objective_rows
from humanline.errors import DataError


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD_KTO = {"prompt": "p", "completion": "c", "label": True}
GOOD_GRPO = [{"prompt": "p", "completion": "a", "score": 1.0},
             {"prompt": "p", "completion": "b", "score": 0.0}]
USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "yo"}

# (id, file name, content, objective, columns, the parts the message must contain)
CASES = [
    ("missing column", "d.jsonl", jsonl({"prompt": "p", "completion": "c"}), "kto", None,
     ["line 1", "field 'label'", "missing column"]),
    ("label 0/1", "d.jsonl", jsonl(GOOD_KTO, {"prompt": "p", "completion": "c", "label": 1}) , "kto", None,
     ["line 2", "field 'label'"]),  # int after bool: refused at load time as a type mix
    ("label int", "d.jsonl", jsonl(*[{"prompt": "p", "completion": "c", "label": i % 2} for i in range(3)]),
     "kto", None, ["line 1", "field 'label'", "boolean", "0/1"]),
    ("label string", "d.jsonl", jsonl({"prompt": "p", "completion": "c", "label": "yes"},
                                      {"prompt": "p", "completion": "c", "label": "no"}),
     "kto", None, ["line 1", "field 'label'", "str 'yes'"]),
    ("label mixed types", "d.jsonl",
     jsonl(GOOD_KTO, GOOD_KTO, {"prompt": "p", "completion": "c", "label": "yes"}), "kto", None,
     ["line 3", "field 'label'", "'yes'"]),
    ("empty completion", "d.jsonl", jsonl(GOOD_KTO, {"prompt": "p", "completion": "", "label": True}), "kto",
     None, ["line 2", "field 'completion'", "empty completion"]),
    ("whitespace completion", "d.jsonl", jsonl({"prompt": "p", "completion": " \n\t", "label": True}), "kto",
     None, ["line 1", "field 'completion'", "whitespace"]),
    ("null prompt", "d.jsonl", jsonl(GOOD_KTO, {"prompt": None, "completion": "c", "label": True}), "kto",
     None, ["line 2", "field 'prompt'", "missing"]),
    ("non-utf8 jsonl", "d.jsonl", jsonl(GOOD_KTO, GOOD_KTO) + b'{"prompt": "caf\xe9", "completion": "c"}\n',
     "kto", None, ["line 3", "UTF-8", "0xe9"]),
    ("unparseable line 17", "d.jsonl", jsonl(*[GOOD_KTO] * 16) + b'{"prompt": "p", "completion": \n', "kto",
     None, ["line 17", "invalid JSON"]),
    ("line not an object", "d.jsonl", jsonl(GOOD_KTO) + b'["p", "c"]\n', "kto", None,
     ["line 2", "JSON object"]),
    ("empty file", "d.jsonl", b"", "kto", None, ["empty"]),
    ("blank lines only", "d.jsonl", b"\n  \n", "kto", None, ["no rows"]),
    ("NaN score", "d.jsonl", jsonl(GOOD_GRPO[0], {"prompt": "p", "completion": "b", "score": float("nan")}),
     "grpo", None, ["line 2", "field 'score'", "finite"]),
    ("score string", "d.jsonl", jsonl({"prompt": "p", "completion": "a", "score": "high"},
                                      {"prompt": "p", "completion": "b", "score": "low"}),
     "grpo", None, ["line 1", "field 'score'", "number"]),
    ("group of size 1", "d.jsonl", jsonl(*GOOD_GRPO, {"prompt": "q", "completion": "a", "score": 1.0}),
     "grpo", None, ["line 3", "field 'prompt'", "size 1"]),
    ("prompt_id group of size 1", "d.jsonl",
     jsonl(*[{**r, "prompt_id": 0} for r in GOOD_GRPO], {"prompt": "p", "completion": "c", "score": 1.0,
                                                        "prompt_id": 1}),
     "grpo", None, ["line 3", "field 'prompt_id'", "size 1"]),
    ("positive old_logps", "d.jsonl", jsonl(*[{**r, "old_logps": [0.5]} for r in GOOD_GRPO]), "grpo", None,
     ["line 1", "field 'old_logps'", "<= 0"]),
    ("messages content missing", "d.jsonl",
     jsonl({"messages": [USER, {"role": "assistant", "text": "yo"}]}), "sft", None,
     ["line 1", "field 'messages[1].content'", "'content' string"]),
    ("messages content of mixed types", "d.jsonl",
     jsonl({"messages": [USER, ASSISTANT]}, {"messages": [USER, {"role": "assistant", "content": ["yo"]}]}),
     "sft", None, ["line 2", "field 'messages'", "mixes types"]),
    ("messages not a list", "d.jsonl", jsonl({"messages": "hi"}), "sft", None,
     ["line 1", "field 'messages'", "list"]),
    ("messages last not assistant", "d.jsonl", jsonl({"messages": [USER, {**ASSISTANT, "role": "user"}]}),
     "sft", None, ["line 1", "field 'messages[1].role'", "'assistant'"]),
    ("chosen role not assistant", "d.jsonl",
     jsonl({"prompt": [USER], "chosen": [USER], "rejected": [ASSISTANT]}), "dpo", None,
     ["line 1", "field 'chosen[0].role'", "'assistant'"]),
    ("implicit prompt with nothing shared", "d.jsonl", jsonl({"chosen": [ASSISTANT], "rejected": [USER]}),
     "dpo", None, ["line 1", "field 'chosen'", "share no prompt"]),
    ("mapped column empty", "d.jsonl", jsonl({"q": "p", "a": "c"}, {"q": "p", "a": ""}), "sft",
     {"prompt": "q", "completion": "a"}, ["line 2", "field 'a'", "empty"]),
    ("unknown mapping key", "d.jsonl", jsonl({"q": "p", "a": "c"}), "sft", {"question": "q"},
     ["unknown name 'question'"]),
    ("csv missing column", "d.csv", b"prompt,answer\np,c\n", "sft", None,
     ["row 0", "field 'completion'", "missing column"]),
    ("csv string label", "d.csv", b"prompt,completion,label\np,c,true\np,c,yes\n", "kto", None,
     ["row 1", "field 'label'", "str 'yes'", "read as text"]),
    ("quoted boolean labels", "d.jsonl", jsonl({"prompt": "p", "completion": "c", "label": "true"}), "kto",
     None, ["line 1", "field 'label'", "unquoted"]),
    ("csv ragged", "d.csv", b"prompt,completion\np,c\np,c,extra\n", "sft", None, ["cannot read CSV"]),
    ("json array syntax", "d.json", b'[\n {"prompt": "p", "completion": "c"},\n {"prompt": }\n]', "sft", None,
     ["line 3", "invalid JSON"]),
    ("json non-utf8", "d.json", b'[\n{"prompt": "p\xff", "completion": "c"}]', "sft", None,
     ["line 2", "UTF-8"]),
    ("json empty array", "d.json", b"[]", "sft", None, ["empty"]),
    ("parquet corrupt", "d.parquet", b"not a parquet file at all", "sft", None, ["cannot read Parquet"]),
    ("unsupported extension", "d.txt", b"hello", "sft", None, ["unsupported file type"]),
]


@pytest.mark.parametrize(("file_name", "content", "objective", "columns", "parts"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_file(tmp_path, file_name, content, objective, columns, parts):
    path = tmp_path / file_name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        to_objective_rows(load_rows(str(path)), objective, columns=columns, source=str(path))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(str(path))
    for part in parts:
        assert part in message, message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_rows(path)


def test_in_memory_rows_are_named_by_row():
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": "  "}]
    with pytest.raises(DataError, match=r"^mine, row 1, field 'completion': empty completion"):
        to_objective_rows(load_rows(rows), "sft", source="mine")
    with pytest.raises(DataError, match=r"list of rows, row 1: each row must be a dict"):
        load_rows([{"prompt": "p"}, "oops"])
    with pytest.raises(DataError, match="empty"):
        load_rows([])


def test_error_attributes_and_tokenize_time_error(tmp_path):
    from humanline.data import tokenize_dataset
    from humanline.tiny import build_tokenizer

    path = tmp_path / "g.jsonl"
    rows = [{**r, "old_logps": [-0.5]} for r in GOOD_GRPO]  # 1 value, but "a" + EOS is 2 tokens
    path.write_bytes(b"\n" + jsonl(*rows))
    canonical = to_objective_rows(load_rows(path), "grpo", source=str(path))
    expected = r"g\.jsonl, line 2, field 'old_logps': old_logps has 1 values"
    with pytest.raises(DataError, match=expected) as err:
        tokenize_dataset(canonical, build_tokenizer(), "grpo", max_prompt_length=8, max_length=16,
                         source=str(path))
    assert (err.value.row, err.value.line, err.value.field) == (0, 2, "old_logps")
