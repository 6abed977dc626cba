"""Generated training data: online / semi-online / initial-policy schedules (rollout/schedule.py), their round
files and resume, rewards failing, every objective run from a config, generation-based evaluation, and a tiny
model that learns a toy verifiable task with online GRPO."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
import torch

from humanline.config import config_from_dict
from humanline.data import prepare
from humanline.errors import DataError, HumanlineError, RewardError
from humanline.evaluation import EvalSamples, GenerationEvaluator
from humanline.rewards import RewardSet
from humanline.rollout.hf import HFGenerator
from humanline.rollout.schedule import (
    RolloutSource,
    build_generator,
    build_reward_set,
    build_rollout_source,
    load_prompt_rows,
)
from humanline.run import train
from humanline.tiny import build_model


def fresh_model(tok, seed: int = 0):
    return build_model(tok, hidden_size=64, num_layers=2, seed=seed)


def digit_share(prompts, completions, **columns):
    """Fraction of digits among the first 6 characters: a dense reward, so samples rarely tie."""
    return [sum(ch.isdigit() for ch in c[:6]) / 6 for c in completions]


def digit_first(prompts, completions, **columns):
    """1 if the completion starts with a digit: a 0/1 verifier."""
    return [float(bool(c) and c[0].isdigit()) for c in completions]


def prompt_rows(n: int = 16, seed: int = 0) -> list[dict]:
    r = random.Random(seed)
    return [{"prompt": "".join(r.choice("abcdefghij") for _ in range(5)), "answer": str(i % 10)} for i in range(n)]


def make_cfg(tmp_path: Path, objective: str = "grpo", every: int = 1, *, steps: int = 3, hl: bool = False,
             **sections):
    data = {
        "model": {"name_or_path": "tiny"},
        "data": {"train": "prompts", "max_length": 24, "max_prompt_length": 12},
        "loss": {"objective": objective},
        "humanline": {"enabled": hl},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "rollout": {"generate_every": every, "offline_source": "initial_policy" if every == 0 else "dataset",
                    "prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6,
                    "rewards": [{"name": "test_online:digit_share"}]},
        "train": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 16, "output_dir": str(tmp_path / "run"),
                  "progress": False, "save_final": False},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


class Counting:
    """Wraps a generator, counting ``generate`` calls and the prompts of each."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def generate(self, prompts, *, n=1, seed=None):
        self.calls.append(len(prompts))
        return self.inner.generate(prompts, n=n, seed=seed)

    def update_weights(self, model):
        self.inner.update_weights(model)


def make_source(cfg, tok, model, rows=None, rewards=(digit_share,)):
    gen = Counting(build_generator(cfg, model, tok))
    source = RolloutSource(cfg, gen, tok, rows or prompt_rows(), build_reward_set(cfg, list(rewards)),
                           policy=lambda: model, run_dir=cfg.train.output_dir)
    return source, gen


# --- prompts ---------------------------------------------------------------------------------------------------


def test_load_prompt_rows(tmp_path, tok):
    cfg = make_cfg(tmp_path)
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "2+2", "answer": "4"}\n{"question": "1+1", "answer": "2"}\n')
    renamed = make_cfg(tmp_path, data={"columns": {"prompt": "question"}})
    rows = load_prompt_rows(renamed, str(path), "train")
    assert rows.column_names == ["prompt", "answer"] and rows["prompt"] == ["2+2", "1+1"]
    chats = load_prompt_rows(cfg, [{"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}]}], "train")
    assert chats["prompt"] == [[{"role": "user", "content": "hi"}]]
    with pytest.raises(DataError, match=r"p.jsonl.*missing column.*'prompt'.*found: question, answer"):
        load_prompt_rows(cfg, str(path), "train")
    path.write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match=r"p.jsonl, line 2, field 'prompt': empty prompt") as err:
        load_prompt_rows(cfg, str(path), "train")
    assert "\n" not in str(err.value)


# --- schedules ---------------------------------------------------------------------------------------------------


def test_semi_online_reuses_a_round_for_n_steps(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo", every=3, steps=7)
    model = fresh_model(tok)
    source, gen = make_source(cfg, tok, model)
    steps = [source.examples_for_step(s) for s in range(7)]
    # Rounds at steps 0, 3 and 6, each N steps' worth of prompts (3 x 4), every sample of a round used once.
    assert gen.calls == [12, 12, 12] and source.rounds_generated == 3
    assert all(len(ex) == 4 * 4 for ex in steps)  # prompts_per_step x num_generations, as online
    key = lambda e: (tuple(e["prompt_ids"]), tuple(e["completion_ids"]), e["advantage"])  # noqa: E731
    round0 = [key(e) for ex in steps[:3] for e in ex]
    assert len(set(round0)) == len(round0) == 48
    # Going back to round 1 samples it again: same prompts, seed and policy, so the same examples.
    assert [source.examples_for_step(s) for s in range(3, 6)] == steps[3:6]
    assert len(gen.calls) == 4
    files = sorted(p.name for p in (tmp_path / "run" / "rollouts").iterdir())
    assert files == [f"round-0000{k}.{ext}" for k in range(3) for ext in ("json", "jsonl")]


def test_online_samples_every_step(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo", every=1, steps=4)
    source, gen = make_source(cfg, tok, fresh_model(tok))
    sizes = [len(source.examples_for_step(s)) for s in range(4)]
    assert gen.calls == [4, 4, 4, 4] and sizes == [16] * 4
    m = source.last_metrics
    assert m["rollout/fresh"] == 1.0 and m["rollout/round"] == 3.0 and m["generation/tokens_per_second"] > 0
    assert source.last_generation_time > 0
    for key in ("reward/mean", "reward/std", "rewards/digit_share/mean", "frac_reward_zero_std",
                "completions/mean_length"):
        assert key in m


def test_initial_policy_samples_once(tmp_path, tok):
    cfg = make_cfg(tmp_path, "dpo", every=0, steps=6, train={"batch_size": 4})
    source, gen = make_source(cfg, tok, fresh_model(tok))
    sizes = [len(source.examples_for_step(s)) for s in range(6)]
    assert gen.calls == [16]  # every prompt, once
    assert sizes == [4] * 6
    assert source.last_metrics["rollout/fresh"] == 0.0 and "generation/tokens_per_second" not in source.last_metrics


@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_round_file_is_offline_data(tmp_path, tok, objective):
    cfg = make_cfg(tmp_path, objective, every=2)
    source, _ = make_source(cfg, tok, fresh_model(tok))
    served = source.examples_for_step(0) + source.examples_for_step(1)
    path = tmp_path / "run" / "rollouts" / "round-00000.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    trained = source._round.examples  # in the file's row order
    assert len(rows) == len(trained) and sorted(map(repr, served)) == sorted(map(repr, trained))
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["steps"] == 2 and meta["objective"] == objective and "reward/mean" in meta["metrics"]
    if objective == "dpo":
        assert all(r["score_chosen"] - r["score_rejected"] > cfg.rollout.pair_threshold for r in rows)
        assert {"prompt", "chosen", "rejected", "chosen_ids", "rejected_ids"} <= set(rows[0])
    if objective == "kto":
        assert {"prompt", "completion", "label", "score", "completion_ids"} <= set(rows[0])
    if objective == "grpo":
        assert {"prompt", "completion", "score", "prompt_id", "advantage", "logps"} <= set(rows[0])
        for row in rows:  # the behaviour log-probs go to the data loader only where the ids line up
            finished = row["completion_ids"][-1] == tok.eos_token_id
            assert (row["old_logps"] == row["logps"]) if finished else row["old_logps"] is None
    # A completion that is EOS at once decodes to "": trained on and kept in the file, but the data loader rejects
    # blank completions (documented), so reusing the file needs those rows dropped.
    sides = ("chosen", "rejected") if objective == "dpo" else ("completion",)
    blank = [any(not r[side].strip() for side in sides) for r in rows]
    if any(blank):
        with pytest.raises(DataError, match="empty"):
            prepare(str(path), objective, tok, max_prompt_length=12, max_length=24)
        path = tmp_path / "kept.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r, b in zip(rows, blank) if not b))
    examples, _ = prepare(str(path), objective, tok, max_prompt_length=12, max_length=24)
    kept = [e for e, b in zip(trained, blank) if not b]
    assert len(examples) == len(kept)
    special = set(tok.all_special_ids)
    for got, want in zip(examples, kept):
        assert got["prompt_ids"] == want["prompt_ids"]
        for side in ("chosen_ids", "rejected_ids") if objective == "dpo" else ("completion_ids",):
            ids = want[side][:-1] if want[side][-1] == tok.eos_token_id else want[side]
            if not special & set(ids):  # else the text lost a sampled special token: the ids cannot come back
                assert got[side] == ids + [tok.eos_token_id]  # the loader ends every completion with EOS
        if objective == "kto":
            assert got["label"] == want["label"]
        if objective == "grpo" and not any(blank):  # same groups: the loader's advantages are the trained ones
            assert got["advantage"] == pytest.approx(want["advantage"], abs=1e-6)


def test_resume_rereads_the_round_file(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo", every=3, steps=9)
    model = fresh_model(tok)
    first, _ = make_source(cfg, tok, model)
    served = [first.examples_for_step(s) for s in range(5)]
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    assert state["round"] == 1
    # A resumed run: the policy has moved on, so sampling again would give other rows.
    moved = fresh_model(tok, seed=1)
    second, gen = make_source(cfg, tok, moved)
    second.load_state_dict(state)
    assert second.examples_for_step(5) == first.examples_for_step(5)
    assert gen.calls == [] and second.last_metrics["rollout/fresh"] == 0.0
    assert served[4] == second.examples_for_step(4)
    second.examples_for_step(6)  # the next round is sampled as usual
    assert gen.calls == [12]


def test_resumed_run_matches_uninterrupted(tmp_path, tok):
    def run(out: Path, steps: int, resume: bool):
        cfg = make_cfg(out, "grpo", every=3, steps=steps,
                       train={"save_final": True, "resume_from": "auto" if resume else None})
        return train(cfg, model=fresh_model(tok), tokenizer=tok, train_dataset=prompt_rows(),
                     rewards=[digit_share])

    whole = run(tmp_path / "a", 5, False)
    run(tmp_path / "b", 2, False)
    resumed = run(tmp_path / "b", 5, True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["rollout/fresh"] for h in resumed.history if "rollout/fresh" in h] == [0.0, 1.0, 0.0]


# --- empty steps and failing rewards ---------------------------------------------------------------------------


def test_a_round_without_pairs_draws_more_prompts(tmp_path, tok):
    cfg = make_cfg(tmp_path, "dpo", every=1)
    calls = []

    def ties_first(prompts, completions, **columns):
        calls.append(len(prompts))
        return [0.0] * len(prompts) if len(calls) == 1 else digit_share(prompts, completions)

    source, gen = make_source(cfg, tok, fresh_model(tok), rewards=[ties_first])
    examples = source.examples_for_step(0)
    assert examples and source.last_metrics["rollout/extra_draws"] == 1.0 and gen.calls == [4, 4]

    def always_ties(prompts, completions, **columns):
        return [1.0] * len(prompts)

    source, gen = make_source(make_cfg(tmp_path / "x", "dpo"), tok, fresh_model(tok), rewards=[always_ties])
    with pytest.raises(HumanlineError, match=r"round 0: no dpo rows from 36 prompts x 4 samples .*pair_threshold"):
        source.examples_for_step(0)
    assert len(gen.calls) == 9


def bad_reward(prompts, completions, **columns):
    raise ValueError("the grader is down")


def test_failing_reward_stops_the_run(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo")
    with pytest.raises(RewardError, match=r"reward 'bad_reward' raised ValueError: the grader is down \(prompt: "):
        train(cfg, model=fresh_model(tok), tokenizer=tok, train_dataset=prompt_rows(), rewards=[bad_reward])


# --- every objective and schedule from a config ------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 2, 0], ids=["online", "semi", "initial"])
@pytest.mark.parametrize("hl", [False, True], ids=["normal", "humanline"])
@pytest.mark.parametrize("objective", ["dpo", "kto", "grpo"])
def test_runs_from_config(tmp_path, tok, objective, hl, every):
    cfg = make_cfg(tmp_path, objective, every, steps=2, hl=hl, train={"batch_size": 4})
    model = fresh_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(cfg, model=model, tokenizer=tok, train_dataset=prompt_rows(), rewards=[(digit_share, 2.0)])
    assert result.step == 2 and len(result.history) == 2
    for h in result.history:
        assert torch.isfinite(torch.tensor(h["loss"])) and h["rollout/rows"] > 0
        assert h["reward/mean"] == pytest.approx(2 * h["rewards/digit_share/mean"])  # the weight applies
    assert [h["rollout/fresh"] for h in result.history] == {1: [1.0, 1.0], 2: [1.0, 0.0], 0: [1.0, 0.0]}[every]
    if hl:
        assert "humanline/ref_lag_steps" in result.history[0]
    after = result.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "reward/mean" in json.loads(lines[0])


def test_build_rollout_source_from_config(tmp_path, tok):
    cfg = make_cfg(tmp_path, "grpo", rollout={"rewards": [{"name": "exact_match", "weight": 2.0},
                                                          {"name": "test_online:digit_share"}]},
                   eval={"generate": True, "num_prompts": 3})
    source, evaluators = build_rollout_source(cfg, fresh_model(tok), tok, prompts=prompt_rows(40))
    assert source.reward_set.names == ["exact_match", "digit_share"] and source.reward_set.weights == [2.0, 1.0]
    assert len(source.prompts) == 37 and len(evaluators) == 1  # min(eval.num_prompts, 10%) held out
    assert evaluators[0].accuracy_reward == "exact_match" and len(evaluators[0].prompts) == 3


# --- generation-based evaluation ---------------------------------------------------------------------------------


def test_evaluator_metrics(tok):
    rows = [{"prompt": "abc"}, {"prompt": "de"}, {"prompt": "fgh"}, {"prompt": "ij"}]
    evaluator = GenerationEvaluator(rows, RewardSet([digit_share, digit_first]), tok, max_new_tokens=5,
                                    num_prompts=4, accuracy="digit_first")
    assert evaluator.accuracy_reward == "digit_first"
    current = EvalSamples(completions=["1a", "b", "22", "x"], scores=[1.5, 0.0, 2.0, 0.0],
                          per_reward={"digit_share": [0.5, 0, 1, 0], "digit_first": [1.0, 0, 1, 0]},
                          lengths=[3, 2, 3, 2], finished=[True, True, True, False])
    evaluator.baseline = EvalSamples(completions=[], scores=[1.0, 0.0, 3.0, 0.5], per_reward={}, lengths=[],
                                     finished=[])
    m = evaluator.metrics(current)
    assert m["eval/reward"] == pytest.approx(3.5 / 4) and m["eval/accuracy"] == 0.5
    assert m["eval/win_rate"] == pytest.approx((1 + 0.5 + 0 + 0) / 4)  # win, tie, loss, loss
    assert m["eval/mean_length"] == 2.5 and m["eval/clipped_ratio"] == 0.25
    assert m["eval/rewards/digit_share/mean"] == pytest.approx(0.375)


def test_evaluator_against_the_initial_policy(tok):
    model = fresh_model(tok)
    evaluator = GenerationEvaluator(prompt_rows(6), [digit_share], tok, max_new_tokens=6, num_prompts=5,
                                    baseline_policy=model)
    assert evaluator.accuracy_reward is None
    same = evaluator(model, 0)  # greedy: the same model ties with itself everywhere
    assert same["eval/win_rate"] == 0.5 and "eval/accuracy" not in same and len(evaluator.prompts) == 5


# --- learning ----------------------------------------------------------------------------------------------------


def sampled_reward(model, tok, prompts: list[str]) -> float:
    rollouts = HFGenerator(model, tok, max_new_tokens=8, temperature=1.0, batch_size=256).generate(
        prompts, n=16, seed=1234)
    scores = digit_first(prompts, [r.completion for r in rollouts])
    return sum(scores) / len(scores)


def learn_digit_first(tmp_path: Path, tok, seed: int) -> tuple[float, float, float]:
    """Online GRPO, 8 prompts x 8 samples per step, 30 steps: reward 1 when the completion starts with a digit
    (about 1 in 10 at random). Returns (initial, final) mean reward of 16 samples on 16 held-out prompts, and the
    seconds the run took."""
    r = random.Random(seed)
    train_prompts = [{"prompt": "".join(r.choice("abcdefghij") for _ in range(6))} for _ in range(32)]
    held_out = ["".join(r.choice("klmnopqrst") for _ in range(6)) for _ in range(16)]
    model = fresh_model(tok, seed=seed)
    initial = sampled_reward(model, tok, held_out)
    cfg = make_cfg(tmp_path / f"s{seed}", "grpo", 1, steps=30, loss={"kl_beta": 0.0},
                   data={"max_length": 32, "max_prompt_length": 16}, optim={"lr": 3e-3},
                   rollout={"prompts_per_step": 8, "num_generations": 8, "max_new_tokens": 8},
                   train={"seed": seed, "micro_batch_size": 64})
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tok, train_dataset=train_prompts, rewards=[digit_first])
    seconds = time.perf_counter() - t0
    return initial, sampled_reward(result.model, tok, held_out), seconds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_online_grpo_learns_a_verifiable_task(tmp_path, tok, seed):
    # About 9 s a seed on one CPU thread: all three seeds stay in the default suite.
    initial, final, _ = learn_digit_first(tmp_path, tok, seed=seed)
    assert initial < 0.25 and final > initial + 0.3, (initial, final)


# --- several processes -------------------------------------------------------------------------------------------

TWO_PROCESS_SCRIPT = '''
import sys
import torch
from safetensors.torch import save_file
from humanline.config import config_from_dict
from humanline.run import train
from humanline.tiny import build_model, build_tokenizer
from test_online import digit_share, prompt_rows, bad_reward

out, objective, fail = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
torch.set_num_threads(1)
tok = build_tokenizer()
cfg = config_from_dict({
    "model": {"name_or_path": "tiny"}, "data": {"train": "prompts", "max_length": 24, "max_prompt_length": 12},
    "loss": {"objective": objective}, "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
    "rollout": {"generate_every": 2, "prompts_per_step": 4, "num_generations": 4, "max_new_tokens": 6,
                "rewards": [{"name": "test_online:digit_share"}]},
    "train": {"max_steps": 3, "micro_batch_size": 2, "output_dir": out, "progress": False, "save_final": False}})
result = train(cfg, model=build_model(tok, hidden_size=64, num_layers=2), tokenizer=tok,
               train_dataset=prompt_rows(), rewards=[bad_reward if fail else digit_share])
if torch.distributed.is_initialized() and torch.distributed.get_rank() == 0 or not torch.distributed.is_initialized():
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, out + "/params.safetensors")
'''


def _launch(tmp_path: Path, name: str, objective: str, nproc: int, fail: bool = False):
    import os
    import subprocess
    import sys

    script = tmp_path / "two_process.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    tests = Path(__file__).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [str(script), str(tmp_path / name), objective, "1" if fail else "0"]
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(29500 + (os.getpid() + 7) % 1000), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_train_on_the_same_rounds(tmp_path):
    """Semi-online DPO, 3 steps: 2 processes (each its half of every step) give the parameters of 1 process, and
    a reward failing on the main process stops both (no hang)."""
    from safetensors.torch import load_file

    for name, nproc in (("one", 1), ("two", 2)):
        proc = _launch(tmp_path, name, "dpo", nproc)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    one, two = load_file(str(tmp_path / "one" / "params.safetensors")), load_file(
        str(tmp_path / "two" / "params.safetensors"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) < 1e-5
    proc = _launch(tmp_path, "fail", "dpo", 2, fail=True)
    assert proc.returncode != 0 and "the grader is down" in proc.stderr
