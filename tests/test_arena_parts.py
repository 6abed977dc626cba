"""The arena's independent parts: tasks, the learned reward model, the report."""

from __future__ import annotations

import json
import math
import random
import time

import pytest

from humanline.arena.report import VERDICT_RULE, comparisons, summary_text, verdict, write_report
from humanline.arena.reward_model import RewardModel, chat_text, gold_agreement, task_groups, train_reward_model
from humanline.arena.tasks import SIGN_OFF, AdditionTask, DescribeTask, extract_answer, make_task, split_of
from humanline.tiny import build_tokenizer

# ------------------------------------------------------------------------------------------------
# Tasks


@pytest.mark.parametrize("task", [AdditionTask(), DescribeTask()], ids=["addition", "describe"])
def test_prompts_are_seeded_distinct_and_splits_disjoint(task):
    assert task.sample_prompts(50, seed=3, split="train") == task.sample_prompts(50, seed=3, split="train")
    assert task.sample_prompts(50, seed=3, split="train") != task.sample_prompts(50, seed=4, split="train")
    texts = {}
    for split in ("train", "validation", "test"):
        rows = task.sample_prompts(200, seed=0, split=split)
        texts[split] = {r["prompt"][0]["content"] for r in rows}
        assert len(texts[split]) == 200  # distinct within a split
        assert all(split_of(t) == split for t in texts[split])
        assert all(r["prompt"][0]["role"] == "user" and set(r) == {"prompt", *task.columns} for r in rows)
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    with pytest.raises(ValueError, match="split"):
        task.sample_prompts(1, split="dev")


def test_addition_gold_rationale_and_sft_rows():
    assert AdditionTask.solution((274, 358)) == "4+8=12 c1; 7+5+1=13 c1; 2+3+1=6; #### 632"
    assert AdditionTask.solution((974, 358)) == "4+8=12 c1; 7+5+1=13 c1; 9+3+1=13 c1; #### 1332"
    task = AdditionTask(digits=3)
    rows = task.sft_rows(20, seed=1)
    assert rows == task.sft_rows(20, seed=1)
    for row in rows:
        a, b = map(int, row["prompt"][0]["content"].split("+"))
        assert 100 <= a <= 999 and 100 <= b <= 999
        assert row["completion"] == [{"role": "assistant", "content": AdditionTask.solution((a, b))}]
        assert row["answer"] == str(a + b)
        # the gold rationale earns full reward
        assert task.reward([row["prompt"]], [row["completion"]], answer=[row["answer"]]) == [1.0]


@pytest.mark.parametrize("text, expected", [
    ("4+8=12 c1; 7+5+1=13 c1; 2+3+1=6; #### 632", "632"),
    ("#### 632 ", "632"),
    ("####632", "632"),
    ("#### 0632", "632"),
    ("#### -5", "-5"),
    ("#### 632.", None),
    ("#### 6 32", None),
    ("#### 632 #### 633", None),
    ("####", None),
    ("632", None),
    ("", None),
    ("# 632", None),
])
def test_extract_answer_edge_cases(text, expected):
    assert extract_answer(text) == expected
    assert extract_answer([{"role": "assistant", "content": text}]) == expected


def test_addition_reward_is_pure_accuracy():
    task = AdditionTask()
    prompts = ["274+358"] * 4
    completions = ["wrong steps; #### 632", "4+8=12 c1; #### 633", "no answer at all", "#### 632."]
    assert task.reward(prompts, completions, answer=["632"] * 4) == [1.0, 0.0, 0.0, 0.0]
    assert task.score(prompts, completions, answer=["632"] * 4) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        task.reward(prompts, completions, answer=["632"])


def test_describe_gold_on_hand_made_responses():
    task = DescribeTask()
    prompt = [{"role": "user", "content": "describe the red fox at the river"}]
    assert task.keywords(prompt) == ("red", "fox", "river")
    best = f"the red fox runs near the river. the fox is red. {SIGN_OFF}"
    off_topic = f"the blue cat runs near the lake. the cat is blue. {SIGN_OFF}"
    repeated = f"the red fox runs near the river. the red fox runs near the river. {SIGN_OFF}"
    dull = f"the red fox sleeps near the river. the fox is red. {SIGN_OFF}"
    unsigned = "the red fox runs near the river. the fox is red."
    rambling = " ".join(["the red fox runs near the river."] * 2 + ["it plays by the river."] * 3)
    scores = dict(zip(["best", "off_topic", "repeated", "dull", "unsigned", "rambling"],
                      task.gold_score([prompt] * 6, [best, off_topic, repeated, dull, unsigned, rambling])))
    assert scores["best"] == pytest.approx(0.8 + 0.4 + 0.3)
    assert scores["unsigned"] == pytest.approx(scores["best"] - 0.4)
    assert scores["dull"] == pytest.approx(scores["best"] - 0.6)
    assert scores["off_topic"] == pytest.approx(scores["best"] - 0.8 - 3 * 0.2)
    assert scores["repeated"] < scores["best"] and scores["rambling"] < scores["best"]
    assert max(scores, key=scores.get) == "best"
    # strings and chat messages give the same scores; gold is deterministic
    assert task.gold_one("describe the red fox at the river", best) == scores["best"]
    assert task.win_rate([prompt] * 3, [best, unsigned, best], [unsigned, unsigned, off_topic]) == pytest.approx(
        (1 + 0.5 + 1) / 3)


def test_describe_sft_data_are_mixed_quality():
    task = DescribeTask()
    rows = task.sft_rows(300, seed=0)
    assert rows == task.sft_rows(300, seed=0)
    gold = task.gold_score([r["prompt"] for r in rows], [r["completion"] for r in rows])
    mean = sum(gold) / len(gold)
    assert min(gold) < mean - 0.5 and max(gold) > mean + 0.5  # room to improve and to get worse
    assert all(r["completion"][0]["role"] == "assistant" for r in rows)


def test_describe_prompt_space_limits():
    task = DescribeTask()
    counts = {split: task.prompt_count(split) for split in ("train", "validation", "test")}
    assert sum(counts.values()) == 16**3 and min(counts.values()) > 300
    with pytest.raises(ValueError, match="only"):
        task.sample_prompts(counts["test"] + 1, split="test")
    rows = task.sft_rows(counts["train"] + 10, seed=0)  # beyond the distinct prompts: repeats
    assert len({r["prompt"][0]["content"] for r in rows}) == counts["train"]


def test_make_task():
    assert isinstance(make_task("addition", digits=2), AdditionTask)
    assert isinstance(make_task("describe"), DescribeTask)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("poetry")


# ------------------------------------------------------------------------------------------------
# Reward model


def test_chat_text_matches_what_the_policy_sees():
    tok = build_tokenizer()
    prompt = [{"role": "user", "content": "describe the red fox at the river"}]
    completion = "the fox runs."
    templated_prompt = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    policy_view = templated_prompt + completion + tok.eos_token
    assert chat_text(tok, prompt, [{"role": "assistant", "content": completion}]) == policy_view
    assert chat_text(tok, prompt[0]["content"], completion) == policy_view


def test_reward_model_beats_chance_and_round_trips(tmp_path):
    task = DescribeTask()
    rm = train_reward_model(task, num_prompts=200, heldout_prompts=40, steps=30, batch_groups=4,
                            eval_size=100, seed=0)
    report = rm.report
    assert report.steps == 30 and report.train_pairs > 0 and report.heldout_pairs > 100
    assert 0.05 < report.flipped_fraction < 0.3
    assert report.heldout_accuracy > 0.6, report  # chance is 0.5

    groups = task_groups(task, 20, 3, "test", seed=1)
    prompts = [p for p, rs in groups for _ in rs]
    completions = [r for _, rs in groups for r in rs]
    scores = rm(prompts, completions)
    assert len(scores) == len(completions) and all(math.isfinite(s) for s in scores)
    # plain strings score like chat messages
    as_strings = rm([p[0]["content"] for p in prompts], completions)
    assert as_strings == pytest.approx(scores, abs=1e-5)
    assert 0.0 <= gold_agreement(rm, task, groups) <= 1.0

    rm.save(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").exists()
    loaded = RewardModel.load(tmp_path / "rm")
    assert loaded(prompts, completions) == pytest.approx(scores, abs=1e-5)
    assert loaded.report == report


def test_reward_model_is_seeded():
    task = DescribeTask()
    kwargs = {"num_prompts": 16, "heldout_prompts": 4, "steps": 2, "batch_groups": 2, "hidden_size": 32, "seed": 5}
    a, b = train_reward_model(task, **kwargs), train_reward_model(task, **kwargs)
    prompts, completions = ["describe the red fox at the river"] * 2, ["the fox runs.", SIGN_OFF]
    assert a(prompts, completions) == b(prompts, completions)
    assert a.report.final_loss == b.report.final_loss


# ------------------------------------------------------------------------------------------------
# Report


def _synthetic_results(humanline_final: dict[str, float], seeds: int = 3) -> dict:
    """Runs whose final metric is target + small seed noise; start 0.3, offline 0.4, online 0.6."""
    rng = random.Random(0)
    runs = []
    for seed in range(seeds):
        runs.append({"task": "addition", "objective": "sft", "arm": "start", "seed": seed, "metric": 0.3})
        runs.append({"task": "addition", "objective": "rft", "arm": "rft", "seed": seed, "metric": 0.55,
                     "gen_time": 5.0, "train_time": 10.0})
        for objective in ("dpo", "grpo"):
            finals = {"offline": 0.4, "online": 0.6, "humanline-offline": humanline_final[objective]}
            for arm, final in finals.items():
                gen = 30.0 if arm == "online" else 0.0
                noise = (seed - 1) * 0.01  # std over 3 seeds = 0.01
                history = [{"step": s, "wall": s * (0.1 + gen / 100) + rng.random() * 0.1,
                            "metric": 0.3 + (final + noise - 0.3) * s / 100} for s in range(0, 101, 20)]
                runs.append({"task": "addition", "objective": objective, "arm": arm, "seed": seed,
                             "metric": final + noise, "history": history, "gen_time": gen, "train_time": 10.0,
                             "lr": 1e-4, "metric_name": "greedy accuracy",
                             "diagnostics": {"humanline/unclamped": 0.8, "clip_ratio/region_mean": 0.2}})
    sweeps = [{"task": "addition", "objective": "dpo", "arm": "humanline-offline", "seed": 0, "metric": m,
               "params": {"lr": lr, "sync_every": 1}, "selected": lr == 1e-4}
              for lr, m in ((1e-5, 0.35), (1e-4, 0.5))]
    return {"runs": runs, "sweeps": sweeps, "meta": {"model": "tiny", "seeds": list(range(seeds))}}


def test_verdict_rule_both_outcomes():
    def arm(mean, std, n=3):
        return {"mean": mean, "std": std, "n": n}

    assert verdict(arm(0.60, 0.02), arm(0.59, 0.01))[0] is True  # gap 0.01 <= spread 0.02
    assert verdict(arm(0.60, 0.01), arm(0.65, 0.01))[0] is True  # humanline better
    held, text = verdict(arm(0.60, 0.01), arm(0.50, 0.02))
    assert held is False and "did not match" in text and "+0.100" in text
    assert verdict(arm(0.60, 0.0, 1), arm(0.599, 0.0, 1))[0] is False  # one seed: no spread
    assert verdict(None, arm(0.5, 0.0))[0] is None
    # with the offline arm: no online-offline gap, no verdict (humanline has nothing to close)
    held, text = verdict(arm(0.60, 0.05), arm(0.70, 0.01), arm(0.58, 0.02))
    assert held is None and "no gap for humanline to close" in text and "online - offline = +0.020" in text
    assert verdict(arm(0.60, 0.01), arm(0.595, 0.01), arm(0.50, 0.02))[0] is True  # online led offline by 0.10
    assert "standard deviation" in VERDICT_RULE


def test_report_files_tables_and_verdicts(tmp_path):
    results = _synthetic_results({"dpo": 0.595, "grpo": 0.45})
    paths = write_report(results, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "results.md", "arena_addition.png"}
    assert set(paths) == {"json", "md", "png:addition"}

    png = paths["png:addition"].read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    md = paths["md"].read_text()
    for objective, arm in [("sft", "start"), ("rft", "rft"), ("dpo", "offline"), ("dpo", "online"),
                           ("dpo", "humanline-offline"), ("grpo", "offline"), ("grpo", "online"),
                           ("grpo", "humanline-offline")]:
        assert f"| addition | {objective} | {arm} |" in md
    assert VERDICT_RULE in md and "lr=0.0001, sync_every=1" in md
    assert "**addition / DPO**: humanline-offline matched online" in md
    assert "**addition / GRPO**: humanline-offline did not match online" in md
    assert "online - humanline = +0.150" in md  # 0.60 - 0.45, computed

    data = json.loads(paths["json"].read_text())
    comps = {c["objective"]: c for c in data["summary"]["comparisons"]}
    assert comps["dpo"]["held"] is True and comps["grpo"]["held"] is False
    # online: 30 s generation + 10 s training; humanline-offline: 10 s
    assert comps["dpo"]["speedup_humanline_vs_online"] == pytest.approx(4.0)
    assert data["runs"] == json.loads(json.dumps(results["runs"]))

    text = summary_text(results)
    assert "addition / DPO: humanline-offline matched online" in text
    assert "addition / GRPO: humanline-offline did not match online" in text
    assert "4.0x less wall-clock" in text


def test_report_overwrites_atomically_and_handles_partial_results(tmp_path):
    write_report(_synthetic_results({"dpo": 0.3, "grpo": 0.7}), tmp_path)
    # a second write replaces the files; a bare list of runs with a missing arm is accepted
    runs = [r for r in _synthetic_results({"dpo": 0.6, "grpo": 0.6}, seeds=1)["runs"]
            if r["arm"] != "humanline-offline" or r["objective"] != "grpo"]
    write_report(runs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arena_addition.png", "results.json", "results.md"]
    md = (tmp_path / "results.md").read_text()
    assert "not decided" in md and "No sweep was run." in md
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]
    by_obj = {c["objective"]: c for c in comparisons(runs)}
    assert by_obj["dpo"]["held"] is True and by_obj["grpo"]["held"] is None


# ------------------------------------------------------------------------------------------------
# The driver


def _job(spec: dict) -> dict:
    """A stand-in arena job (top level: the spawned workers import it)."""
    if spec.get("fail"):
        raise ValueError(f"job failed: {spec['name']}")
    time.sleep(spec.get("sleep", 0.0))
    return {"name": spec["name"]}


def test_a_failing_job_is_the_error_raised_not_the_other_pipelines_cancellation(monkeypatch, tmp_path):
    from humanline.arena import runner

    def pipeline(task: str, pool: runner._Pool, p: runner.Preset, out) -> tuple:
        if task == "addition":  # queued behind the failing job: cancelled when it fails
            time.sleep(0.5)
            return pool.run_all(_job, [{"name": f"slow{i}", "sleep": 1.0} for i in range(6)])
        return pool.run_all(_job, [{"name": "bad", "fail": True}])

    monkeypatch.setattr(runner, "_task_pipeline", pipeline)
    with pytest.raises(ValueError, match="job failed: bad"):
        runner.run_arena(str(tmp_path), preset="quick", workers=2)
