"""Feedback builders on hand-made rollouts and scores: GRPO groups, DPO pairs, KTO rows, JSONL writing."""

from __future__ import annotations

import json
import math

import pytest

from humanline.errors import HumanlineError
from humanline.feedback import save_jsonl, to_binary, to_groups, to_pairs
from humanline.rollout.base import Rollout


def make_rollouts(groups: list[int], prompt=None) -> list[Rollout]:
    """One rollout per entry of ``groups``; completion text 'c<i>' and ids [i, i] so rows are traceable."""
    return [Rollout(prompt=prompt or f"prompt {g}", prompt_ids=[100 + g], completion_ids=[i, i],
                    completion=f"c{i}", logps=[-0.5, -1.0], group=g, finished=True)
            for i, g in enumerate(groups)]


def test_to_groups_advantages_and_zero_std():
    rollouts = make_rollouts([0, 0, 0, 1, 1, 1, 2])
    scores = [1.0, 0.0, 0.5, 0.1, 0.1, 0.1, 3.0]  # group 1 ties, group 2 has one sample
    rows, stats = to_groups(rollouts, scores)
    assert len(rows) == 7 and stats["groups"] == 3
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)
    adv = [r["advantage"] for r in rows]
    std = math.sqrt(((0.5) ** 2 * 2) / 3)
    assert adv[:3] == pytest.approx([0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.0], abs=1e-6)
    assert adv[3:] == [0.0, 0.0, 0.0, 0.0]  # exact zeros, not rounding residue
    assert rows[0]["old_logps"] == [-0.5, -1.0] and rows[0]["completion_ids"] == [0, 0]
    assert rows[0]["prompt_ids"] == [100] and rows[4]["prompt_id"] == 1
    kept, stats = to_groups(rollouts, scores, drop_zero_std=True, keep_ids=False)
    assert [r["completion"] for r in kept] == ["c0", "c1", "c2"] and "old_logps" not in kept[0]
    assert stats["frac_reward_zero_std"] == pytest.approx(2 / 3)


def test_to_pairs_best_worst_threshold_and_ties():
    rollouts = make_rollouts([0, 0, 0, 1, 1, 2, 2])
    scores = [0.2, 0.9, 0.9, 0.5, 0.505, 0.3, 0.3]  # group 0: tie at the top; 1: gap below 0.01; 2: all tie
    rows, stats = to_pairs(rollouts, scores)
    assert stats == {"pairs": 1, "prompts": 3, "prompts_skipped": 2}
    (row,) = rows
    assert (row["chosen"], row["rejected"]) == ("c1", "c0")  # the first of the tied best
    assert (row["score_chosen"], row["score_rejected"]) == (0.9, 0.2)
    assert row["prompt"] == "prompt 0" and row["chosen_ids"] == [1, 1] and row["rejected_ids"] == [0, 0]
    rows, _ = to_pairs(rollouts, scores, threshold=0.001)
    assert len(rows) == 2  # the 0.005 gap now counts


def test_to_pairs_all_and_random():
    rollouts = make_rollouts([0, 0, 0, 0])
    scores = [0.0, 1.0, 2.0, 2.0]
    rows, stats = to_pairs(rollouts, scores, rule="all")
    pairs = {(r["chosen"], r["rejected"]) for r in rows}
    assert pairs == {("c1", "c0"), ("c2", "c0"), ("c3", "c0"), ("c2", "c1"), ("c3", "c1")}
    first, _ = to_pairs(rollouts, scores, rule="random", seed=3)
    again, _ = to_pairs(rollouts, scores, rule="random", seed=3)
    assert first == again  # deterministic given the seed
    for r in first:
        assert r["score_chosen"] - r["score_rejected"] > 0.01
    used = [r["chosen"] for r in first] + [r["rejected"] for r in first]
    assert len(used) == len(set(used))  # random pairs are disjoint
    seen = {tuple(sorted((r["chosen"], r["rejected"]) for r in to_pairs(rollouts, scores, rule="random",
                                                                       seed=s)[0])) for s in range(20)}
    assert len(seen) > 1  # different seeds, different pairings
    with pytest.raises(HumanlineError, match="unknown pair rule"):
        to_pairs(rollouts, scores, rule="worst")


def test_chat_prompts_get_assistant_messages():
    messages = [{"role": "user", "content": "hi"}]
    rows, _ = to_pairs(make_rollouts([0, 0], prompt=messages), [1.0, 0.0])
    assert rows[0]["prompt"] == messages
    assert rows[0]["chosen"] == [{"role": "assistant", "content": "c0"}]


def test_to_binary_rules():
    rollouts = make_rollouts([0, 0, 0, 1, 1, 1])
    scores = [0.0, 0.5, 1.0, 0.5, 0.5, 0.5]
    rows, stats = to_binary(rollouts, scores)  # pairs: group 0 gives one of each, group 1 ties
    assert [(r["completion"], r["label"]) for r in rows] == [("c2", True), ("c0", False)]
    assert stats["desirable"] == 1 and stats["undesirable"] == 1
    rows, stats = to_binary(rollouts, scores, rule="median")  # median 0.5: ties at the median undesirable
    assert [r["label"] for r in rows] == [False, False, True, False, False, False]
    rows, _ = to_binary(rollouts, scores, rule="mean")  # mean 0.5
    assert [r["label"] for r in rows] == [False, False, True, False, False, False]
    rows, _ = to_binary(rollouts, scores, rule="value", threshold=0.5)  # a pass mark: >=
    assert [r["label"] for r in rows] == [False, True, True, True, True, True]
    assert rows[0]["completion_ids"] == [0, 0] and rows[0]["score"] == 0.0
    tied, stats = to_binary(rollouts, [1.0] * 6, rule="median")
    assert stats["desirable"] == 0  # an all-tie round is never all desirable
    with pytest.raises(HumanlineError, match="needs a threshold"):
        to_binary(rollouts, scores, rule="value")
    with pytest.raises(HumanlineError, match="computes its own threshold"):
        to_binary(rollouts, scores, rule="median", threshold=0.3)
    with pytest.raises(HumanlineError, match="6 rollouts but 2 scores"):
        to_binary(rollouts, [0.0, 1.0])


def test_save_jsonl_is_atomic_and_json_only(tmp_path):
    rows, _ = to_pairs(make_rollouts([0, 0]), [1.0, 0.0])
    path = tmp_path / "out" / "pairs.jsonl"
    assert save_jsonl(rows, path) == str(path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    with pytest.raises(HumanlineError, match="row 1 is not JSON"):
        save_jsonl([{"a": 1}, {"a": float("nan")}], path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows  # old file intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["pairs.jsonl"]  # no temporary left
