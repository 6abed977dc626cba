"""The data path: loading, TRL formats, tokenisation (template, BOS, EOS, masks, truncation), collation."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch
from tokenizers import processors

from humanline.data import (
    LINE_COLUMN,
    batches,
    collate,
    detect_format,
    encode_completion,
    encode_prompt,
    load_rows,
    prepare,
    to_objective_rows,
    tokenize_dataset,
    validate_rows,
)
from humanline.errors import DataError
from humanline.tiny import build_tokenizer


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bos_tok():
    """The tiny tokenizer made to add BOS itself, like Llama's: the template's BOS must not double."""
    t = build_tokenizer()
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", t.bos_token_id)])
    return t


@pytest.fixture(scope="module")
def pad_eos_tok():
    t = build_tokenizer()
    t.pad_token = t.eos_token
    return t


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --- loading ---------------------------------------------------------------------------------------------

def test_load_jsonl_keeps_line_numbers(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "c", "completion": "d"}\n')
    ds = load_rows(str(path))
    assert ds[LINE_COLUMN] == [1, 3]
    assert ds["prompt"] == ["a", "c"]


@pytest.mark.parametrize("ext", ["json", "parquet", "csv"])
def test_load_other_files(tmp_path, ext):
    rows = [{"prompt": "p1", "completion": "c1", "label": True}, {"prompt": "p2", "completion": "c2",
                                                                  "label": False}]
    path = tmp_path / f"d.{ext}"
    if ext == "json":
        path.write_text(json.dumps(rows))
    else:
        df = datasets.Dataset.from_list(rows)
        df.to_parquet(str(path)) if ext == "parquet" else df.to_csv(str(path), index=False)
    ds = load_rows(path)
    assert ds.to_list() == rows


def test_load_in_memory_and_hub(monkeypatch):
    ds = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])
    assert load_rows(ds) is ds
    assert load_rows(datasets.DatasetDict({"test": ds}), split="test") is ds
    calls = []

    def fake_load(repo, name=None, *, split=None):
        calls.append((repo, name, split))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert load_rows("org/some-set", split="test", name="cfg") is ds
    assert calls == [("org/some-set", "cfg", "test")]


def test_hub_failure_is_one_line(monkeypatch):
    def boom(*a, **k):
        raise ConnectionError("no network\nat all")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="org/x: could not load .* no network at all") as err:
        load_rows("org/x")
    assert "\n" not in str(err.value)


def test_json_file_holding_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    assert load_rows(path)["a"] == [1, 2]


# --- formats ---------------------------------------------------------------------------------------------

CONV = {
    "sft": [{"messages": [*user("hi"), *assistant("yo")]}, {"messages": [*user("a"), *assistant("b")]}],
    "dpo": [{"prompt": user("hi"), "chosen": assistant("yo"), "rejected": assistant("no")}] * 2,
    "kto": [{"prompt": user("hi"), "completion": assistant("yo"), "label": True},
            {"prompt": user("hi"), "completion": assistant("no"), "label": False}],
    "grpo": [{"prompt": user("hi"), "completion": assistant("yo"), "score": 1.0},
             {"prompt": user("hi"), "completion": assistant("no"), "score": 0.0}],
}
STD = {
    "sft": [{"prompt": "hi", "completion": "yo"}, {"prompt": "a", "completion": "b"}],
    "dpo": [{"prompt": "hi", "chosen": "yo", "rejected": "no"}] * 2,
    "kto": [{"prompt": "hi", "completion": "yo", "label": True}, {"prompt": "hi", "completion": "no",
                                                                  "label": False}],
    "grpo": [{"prompt": "hi", "completion": "yo", "score": 1},
             {"prompt": "hi", "completion": "no", "score": 0}],
}
FIELDS = {"sft": {"prompt_ids", "completion_ids"}, "dpo": {"prompt_ids", "chosen_ids", "rejected_ids"},
          "kto": {"prompt_ids", "completion_ids", "label"},
          "grpo": {"prompt_ids", "completion_ids", "advantage"}}


@pytest.mark.parametrize("style", ["standard", "conversational"])
@pytest.mark.parametrize("objective", ["sft", "dpo", "kto", "grpo"])
def test_each_format_end_to_end(tok, objective, style):
    rows = (STD if style == "standard" else CONV)[objective]
    examples, stats = prepare(rows, objective, tok, max_prompt_length=16, max_length=32)
    assert stats.rows == len(examples) == 2 and stats.truncated_rows == 0
    assert set(examples[0]) == FIELDS[objective]
    for e in examples:
        for key in FIELDS[objective] & {"completion_ids", "chosen_ids", "rejected_ids"}:
            assert e[key][-1] == tok.eos_token_id
    batch = collate(examples, objective, pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape[0] == (4 if objective in ("dpo", "kto") else 2)


def test_conversational_matches_full_template(tok):
    """Prompt (with generation prompt) + completion content + EOS == the template over the whole chat."""
    chat = [*user("hi there"), *assistant("fine")]
    full = tok.apply_chat_template(chat, tokenize=False)
    assert encode_prompt(tok, chat[:1]) + encode_completion(tok, chat[1:]) == tok(full)["input_ids"]


def test_column_mapping(tok):
    rows = [{"question": "q", "answer": "a"}, {"question": "r", "answer": "b"}]
    ds = to_objective_rows(rows, "sft", columns={"prompt": "question", "completion": "answer"})
    assert ds["prompt"] == ["q", "r"] and ds["completion"] == ["a", "b"]
    with pytest.raises(DataError, match="field 'answer': empty completion"):
        to_objective_rows([{"question": "q", "answer": " "}], "sft",
                          columns={"prompt": "question", "completion": "answer"}, source="mine")


def test_paired_to_kto():
    rows = [{"prompt": "p1", "chosen": "good", "rejected": "bad"},
            {"prompt": "p2", "chosen": "g", "rejected": "b"}]
    assert detect_format(["prompt", "chosen", "rejected"], "kto") == "preference"
    ds = to_objective_rows(rows, "kto")
    assert [(r["prompt"], r["completion"], r["label"]) for r in ds] == [
        ("p1", "good", True), ("p1", "bad", False), ("p2", "g", True), ("p2", "b", False)]


def test_implicit_prompt():
    conv = [{"chosen": [*user("q"), *assistant("yes")], "rejected": [*user("q"), *assistant("no")]}]
    ds = to_objective_rows(conv, "dpo")
    assert ds[0]["prompt"] == user("q") and ds[0]["chosen"] == assistant("yes")
    std = to_objective_rows([{"chosen": "Q: 2+2? 4", "rejected": "Q: 2+2? 5"}], "dpo")
    assert std[0]["prompt"] == "Q: 2+2?" and std[0]["chosen"] == " 4"


def test_string_prompt_beside_whole_conversations_uses_their_shared_prefix():
    # princeton-nlp/llama3-ultrafeedback-armorm: a text `prompt` column and chosen / rejected holding the user
    # turn too. TRL's rule: split the shared prefix off as the prompt (the text column is not used).
    pair = {"prompt": "q", "chosen": [*user("q"), *assistant("yes")], "rejected": [*user("q"), *assistant("no")]}
    for objective in ("dpo", "kto"):
        ds = to_objective_rows([pair], objective)
        assert ds[0]["prompt"] == user("q")
        assert ds[0]["chosen" if objective == "dpo" else "completion"] == assistant("yes")
    # Replies alone (one assistant message) keep the prompt column.
    ds = to_objective_rows([{**pair, "chosen": assistant("yes"), "rejected": assistant("no")}], "dpo")
    assert ds[0]["prompt"] == "q" and ds[0]["rejected"] == assistant("no")
    # The two forms mixed in one data set: one line naming the rows.
    with pytest.raises(DataError, match=r"row 1.*hold the prompt turns here but do not in row 0"):
        to_objective_rows([{**pair, "chosen": assistant("yes"), "rejected": assistant("no")}, pair], "dpo")
    with pytest.raises(DataError, match="must hold exactly one assistant message"):
        to_objective_rows([{**pair, "chosen": [*user("q"), *assistant("a"), *assistant("b")]}], "dpo")

def test_sft_messages_split():
    chat = [{"role": "system", "content": "be brief"}, *user("hi"), *assistant("yo")]
    ds = to_objective_rows([{"messages": chat}], "sft")
    assert ds[0]["prompt"] == chat[:2] and ds[0]["completion"] == chat[2:]


def group_adv(scores):
    t = torch.tensor(scores, dtype=torch.float64)
    return ((t - t.mean()) / (t.std(unbiased=False) + 1e-4)).tolist()


def test_grpo_groups_by_prompt():
    table = [("a", "x", 1.0), ("b", "x", 5.0), ("a", "y", 0.0), ("b", "y", 3.0), ("a", "z", 2.0)]
    rows = [{"prompt": p, "completion": c, "score": s} for p, c, s in table]
    adv = to_objective_rows(rows, "grpo")["advantage"]
    assert adv[0::2] == pytest.approx(group_adv([1.0, 0.0, 2.0]))
    assert adv[1::2] == pytest.approx(group_adv([5.0, 3.0]))


def test_grpo_groups_by_prompt_id_and_conversational_prompt():
    rows = [{"prompt": user("a"), "prompt_id": 7, "completion": "x", "score": 1},
            {"prompt": user("a, reworded"), "prompt_id": 7, "completion": "y", "score": 0},
            {"prompt": user("b"), "prompt_id": 8, "completion": "x", "score": 2},
            {"prompt": user("b"), "prompt_id": 8, "completion": "y", "score": 2}]
    adv = to_objective_rows(rows, "grpo")["advantage"]
    assert adv[:2] == pytest.approx(group_adv([1, 0])) and adv[2:] == [0.0, 0.0]


# --- tokenisation ----------------------------------------------------------------------------------------

def test_single_bos_when_tokenizer_and_template_both_add_it(bos_tok):
    bos = bos_tok.bos_token_id
    ids = encode_prompt(bos_tok, user("hi"))
    assert ids[0] == bos and ids.count(bos) == 1
    assert encode_prompt(bos_tok, "hi") == [bos, *bos_tok("hi", add_special_tokens=False)["input_ids"]]


def test_bos_added_once_when_template_lacks_it(bos_tok):
    t = bos_tok
    saved = t.chat_template
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        ids = encode_prompt(t, user("hi"))
    finally:
        t.chat_template = saved
    assert ids[0] == t.bos_token_id and ids.count(t.bos_token_id) == 1


def test_no_bos_for_tokenizer_without_one(tok):
    assert tok.bos_token_id not in encode_prompt(tok, "hi")  # the tiny tokenizer adds none itself
    assert encode_prompt(tok, user("hi")).count(tok.bos_token_id) == 1  # its template does


def test_eos_appended_once(tok):
    eos = tok.eos_token_id
    assert encode_completion(tok, "ok")[-1] == eos
    assert encode_completion(tok, "ok</s>").count(eos) == 1
    assert encode_completion(tok, {"role": "assistant", "content": "ok"}) == encode_completion(tok, "ok")


def test_prompt_masked_and_eos_kept_with_pad_equal_eos(pad_eos_tok):
    t = pad_eos_tok
    rows = [{"prompt": "hello", "completion": "a"}, {"prompt": "hi", "completion": "longer"}]
    examples, _ = prepare(rows, "sft", t, max_prompt_length=16, max_length=32)
    batch = collate(examples, "sft", pad_token_id=t.pad_token_id)
    labels, ids = batch["labels"], batch["input_ids"]
    for i, e in enumerate(examples):
        n, m = len(e["prompt_ids"]), len(e["completion_ids"])
        assert (labels[i, :n] == -100).all()
        assert labels[i, n + m - 1] == t.eos_token_id  # the EOS label survives pad == eos
        assert (labels[i, n + m:] == -100).all() and (ids[i, n + m:] == t.eos_token_id).all()
    assert batch["num_response_tokens"] == sum(len(e["completion_ids"]) for e in examples)


def test_truncation(tok):
    rows = [{"prompt": "abcdefghij", "completion": "klmnopqrst"}, {"prompt": "ab", "completion": "cd"},
            {"prompt": "ab", "completion": "cdefghijklmnop"}]
    examples, stats = tokenize_dataset(to_objective_rows(rows, "sft"), tok, "sft", max_prompt_length=4,
                                       max_length=8)
    assert examples[0]["prompt_ids"] == tok("ghij")["input_ids"]  # cut from the left
    assert examples[0]["completion_ids"] == tok("klmn")["input_ids"]  # from the right, EOS cut too
    assert examples[1]["completion_ids"] == [*tok("cd")["input_ids"], tok.eos_token_id]
    assert len(examples[2]["prompt_ids"]) + len(examples[2]["completion_ids"]) == 8
    counts = (stats.rows, stats.truncated_rows, stats.truncated_prompts, stats.truncated_completions)
    assert counts == (3, 2, 1, 2)


def test_truncation_keeps_bos_and_fits_both_dpo_sides(bos_tok):
    rows = [{"prompt": "abcdefgh", "chosen": "x", "rejected": "yyyyyyyyyy"}]
    examples, stats = prepare(rows, "dpo", bos_tok, max_prompt_length=4, max_length=8)
    e = examples[0]
    assert e["prompt_ids"] == [bos_tok.bos_token_id, *bos_tok("fgh", add_special_tokens=False)["input_ids"]]
    assert len(e["chosen_ids"]) == 2 and len(e["rejected_ids"]) == 4 and stats.truncated_rows == 1


def test_grpo_old_logps_truncated_alongside(tok):
    rows = [{"prompt": "p", "completion": "abc", "score": 1, "old_logps": [-0.1, -0.2, -0.3, -0.4]},
            {"prompt": "p", "completion": "ab", "score": 0, "old_logps": None}]
    examples, _ = prepare(rows, "grpo", tok, max_prompt_length=2, max_length=3)
    assert examples[0]["old_logps"] == [-0.1, -0.2] and "old_logps" not in examples[1]


# --- collation -------------------------------------------------------------------------------------------

def ex(p, c, **extra):
    return {"prompt_ids": p, "completion_ids": c, **extra}


def test_pads_to_longest_in_micro_batch_not_max_length(tok):
    rows = [{"prompt": "ab", "completion": "c"}, {"prompt": "abcd", "completion": "efgh"}]
    examples, _ = prepare(rows, "sft", tok, max_prompt_length=64, max_length=512)
    batch = collate(examples, "sft", pad_token_id=0)
    assert batch["input_ids"].shape == (2, 9) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].tolist()[0] == [1] * 4 + [0] * 5
    assert collate(examples[:1], "sft", pad_token_id=0)["input_ids"].shape == (1, 4)


def test_dpo_rows_chosen_then_rejected():
    e = [{"prompt_ids": [1], "chosen_ids": [10], "rejected_ids": [20, 21]},
         {"prompt_ids": [2], "chosen_ids": [11], "rejected_ids": [22]}]
    batch = collate(e, "dpo", pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 0], [2, 11, 0], [1, 20, 21], [2, 22, 0]]
    assert batch["labels"].tolist()[2] == [-100, 20, 21]
    assert batch["num_response_tokens"] == 2  # first B rows only


def test_kto_kl_rows_mismatch():
    e = [ex([1], [10], label=True), ex([2], [20], label=False), ex([3], [30, 31], label=True)]
    batch = collate(e, "kto", pad_token_id=0)
    assert batch["input_ids"][3:].tolist() == [[1, 20, 0], [2, 30, 31], [3, 10, 0]]
    assert batch["label"].tolist() == [True, False, True] and batch["label"].dtype == torch.bool
    single = collate(e[:1], "kto", pad_token_id=0)  # B == 1: the KL row is the example itself
    assert single["input_ids"].tolist() == [[1, 10], [1, 10]]
    pair = [ex([1, 2, 3], [10], label=True), ex([4], [20, 21, 22], label=False)]
    cut = collate(pair, "kto", pad_token_id=0, max_length=4)
    assert cut["input_ids"][2].tolist() == [1, 2, 3, 20]


def test_grpo_old_logps_aligned_with_shifted_labels():
    e = [ex([1, 2], [10, 11], advantage=0.5, old_logps=[-1.0, -2.0]), ex([3], [12, 13, 14], advantage=-0.5)]
    batch = collate(e, "grpo", pad_token_id=0)
    t = batch["input_ids"].shape[1]
    assert batch["old_logps"].shape == (2, t - 1)
    assert batch["old_logps"][0].tolist() == [0.0, -1.0, -2.0]
    assert batch["old_logps"][1].tolist() == [0.0, 0.0, 0.0]
    # position t scores labels[t + 1]: each old log-prob sits one left of its label
    labels = batch["labels"][0]
    assert [int(labels[j + 1]) for j in (1, 2)] == [10, 11]
    assert batch["has_old_logps"].tolist() == [True, False]
    assert batch["advantages"].tolist() == [0.5, -0.5] and batch["advantages"].dtype == torch.float32
    assert batch["num_response_tokens"] == 5


def test_batches_seeded_and_drop_last():
    a = batches(10, 3, seed=1, epoch=0)
    assert a == batches(10, 3, seed=1, epoch=0)
    assert a != batches(10, 3, seed=1, epoch=1)
    assert len(a) == 3 and all(len(b) == 3 for b in a) and len({i for b in a for i in b}) == 9
    assert batches(4, 2, seed=0, shuffle=False) == [[0, 1], [2, 3]]
    with pytest.raises(DataError):
        batches(2, 3, seed=0)


def test_validate_returns_kind_and_revalidates_converted_rows():
    rows = to_objective_rows(STD["grpo"], "grpo")
    assert validate_rows(rows, "grpo") == "scored"
    assert not any(math.isnan(a) for a in rows["advantage"])
