"""Rewards: answer extraction, built-ins, loading by name / import path, the reward-model scorer, and the
checks that turn a broken reward into a one-line RewardError."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from humanline.errors import HumanlineError, RewardError
from humanline.rewards import (
    RewardModelScorer,
    RewardSet,
    combine_rewards,
    exact_match_reward,
    extract_answer,
    format_reward,
    load_reward,
    math_verify_reward,
    normalize_answer,
    score,
)


@pytest.mark.parametrize("text, expected", [
    (r"so the answer is \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} then \boxed{\sqrt{x^{2}+1}} end", r"\sqrt{x^{2}+1}"),  # the last box, nested braces
    (r"\boxed{3} and #### 4", "3"),  # boxed wins over ####
    ("Work...\n#### 1,234\n", "1,234"),
    ("We get 3 apples, then 12.", "12"),
    ("It costs $3.50 in total", "3.50"),
    ("x = -5", "-5"),
    ("pages 3-5", "5"),  # a hyphen between numbers is no minus sign
    ("1,2,3", "3"),
    ("total 1,234,567 items", "1,234,567"),
    ("no number here", None),
    (r"unclosed \boxed{12", "12"),  # falls back to the last number
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("a, b", [("1,234", "1234"), ("3.50", "3.5"), ("-0", "0"), ("42.", "42"),
                                  ("$5", "5"), ("10.0", "10"), (" X + 1 ", "x+1")])
def test_normalize_answer(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_exact_match_reward():
    completions = ["... so #### 1,234", r"\boxed{3.50}", "the answer is -7", "I don't know",
                   r"\boxed{\frac12}"]
    answers = ["Reasoning here\n#### 1234", "3.5", "-7", "4", r"\frac12"]
    assert exact_match_reward([""] * 5, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 1.0]
    with pytest.raises(HumanlineError, match="needs a 'answer' column"):
        exact_match_reward(["p"], ["1"], solution=["1"])


def test_format_reward():
    fmt = format_reward()
    completions = ["Add them: 2+2=4.\n#### 4", "#### 4", "4", "Think.\n#### 4\nmore text", "Think\n####   \n"]
    assert fmt([""] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert format_reward(r"<think>.*</think>.*")([""], ["<think>x</think> 1"]) == [1.0]
    with pytest.raises(HumanlineError, match="bad regular expression"):
        format_reward("(")


def test_math_verify_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(HumanlineError, match=r"pip install 'humanline\[math\]'"):
        math_verify_reward(["p"], ["1"], answer=["1"])


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length(prompts, completions, **kw):\n"
        "    return [float(len(c)) for c in completions]\n"
        "NOT_CALLABLE = 3\n"
    )
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("my_rewards", "broken_rewards"):
        sys.modules.pop(name, None)


def test_load_reward_by_name_and_path(reward_module):
    assert load_reward("exact_match") is exact_match_reward
    assert load_reward("format")([""], ["a\n#### 1"]) == [1.0]
    fn = load_reward("my_rewards:length")
    assert fn(["p"], ["abc"]) == [3.0]


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope'"),
    ("a:b:c", "unknown reward"),
    ("missing_module_xyz:fn", "cannot import 'missing_module_xyz'"),
    ("broken_rewards:fn", "RuntimeError: boom at import"),
    ("my_rewards:absent", "has no attribute 'absent'"),
    ("my_rewards:NOT_CALLABLE", "not callable"),
])
def test_load_reward_bad_specs(reward_module, spec, message):
    with pytest.raises(HumanlineError, match=message) as info:
        load_reward(spec)
    assert "\n" not in str(info.value)


def test_reward_set_weights_names_and_metrics():
    def one(prompts, completions, **kw):
        return [1.0] * len(prompts)

    rs = RewardSet([exact_match_reward, one, one], weights=[2.0, 1.0, 0.5])
    assert rs.names == ["exact_match", "one", "one_2"]
    result = rs(["p", "q"], ["#### 3", "#### 4"], answer=["3", "5"])
    assert result.scores == [3.5, 1.5]
    assert result.per_reward["exact_match"] == [1.0, 0.0]
    metrics = result.metrics()
    assert metrics["rewards/exact_match/mean"] == 0.5 and metrics["reward/mean"] == 2.5
    combined = combine_rewards([(exact_match_reward, 1.0), (one, 0.5)])
    assert combined(["p"], ["#### 3"], answer=["3"]) == [1.5]
    assert score(["exact_match"], ["p"], ["#### 3"], {"answer": ["3"]}).scores == [1.0]


def _raises_on_bad(prompts, completions, **kw):
    if any("bad" in c for c in completions):
        raise ValueError("cannot score this\nsecond line")
    return [0.0] * len(prompts)


def _nan(prompts, completions, **kw):
    return [0.0, math.nan]


def _short(prompts, completions, **kw):
    return [1.0]


def _strings(prompts, completions, **kw):
    return [1.0, "high"]


def _none(prompts, completions, **kw):
    return [None, 1.0]


@pytest.mark.parametrize("fn, message", [
    (_raises_on_bad, r"'_raises_on_bad' raised ValueError: cannot score this \(prompt: 'second prompt"),
    (_nan, r"reward '_nan' returned nan \(prompt: 'second prompt"),
    (_short, r"reward '_short' returned 1 values for 2 completions \(first prompt: 'first prompt'\)"),
    (_strings, r"reward '_strings' returned str 'high', not a number \(prompt: 'second prompt"),
    (_none, r"reward '_none' returned NoneType None, not a number \(prompt: 'first prompt'\)"),
])
def test_failing_rewards_raise_one_line_errors(fn, message):
    prompts = ["first prompt", [{"role": "user", "content": "second prompt " + "x" * 200}]]
    with pytest.raises(RewardError, match=message) as info:
        RewardSet([fn])(prompts, ["fine", "bad"])
    text = str(info.value)
    assert "\n" not in text and len(text) < 250  # the long prompt is cut to ~80 characters


def test_reward_set_checks_column_lengths():
    with pytest.raises(RewardError, match="column 'answer' has 1 values for 2 prompts"):
        RewardSet(["exact_match"])(["p", "q"], ["1", "2"], answer=["1"])


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from humanline.tiny import build_tokenizer

    tok = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    path = tmp_path_factory.mktemp("rm") / "rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_reward_model_scorer(reward_model_dir):
    scorer = RewardModelScorer(reward_model_dir, batch_size=2, device="cpu")
    prompts = ["2+2?", [{"role": "user", "content": "Say hi"}], "a much longer prompt than the others"]
    completions = ["4", "hi!", "x"]
    scores = scorer(prompts, completions)
    assert len(scores) == 3 and all(isinstance(s, float) and math.isfinite(s) for s in scores)
    # batched (right padding) == one at a time == a plain forward over the chat-formatted text
    one_by_one = [RewardModelScorer(reward_model_dir, batch_size=1)([p], [c])[0]
                  for p, c in zip(prompts, completions)]
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(one_by_one), atol=1e-5, rtol=0)
    ids = scorer.encode(prompts[1], completions[1])
    assert ids == scorer.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi!"}], tokenize=True,
    )["input_ids"]
    with torch.no_grad():
        direct = scorer.model(torch.tensor([ids])).logits[0, 0].item()
    assert abs(direct - scores[1]) < 1e-5
    assert RewardSet([scorer]).names == ["reward_model"]


def test_reward_model_scorer_bad_path(tmp_path):
    with pytest.raises(HumanlineError, match="cannot load reward model"):
        RewardModelScorer(str(tmp_path / "missing"))
