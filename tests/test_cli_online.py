"""The CLI around generated data: sample -> label -> train on the labelled file -> eval, label formats, online
training from a recipe, and one-line errors (exit code 2) for a failing reward or a bad samples file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from humanline.cli import main
from humanline.data import prepare
from humanline.tiny import build_tokenizer, save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("cli-online") / "model"), hidden_size=64, num_layers=2)


def digit_share(prompts, completions, **columns):
    """Fraction of digits among the first 6 characters (dense: samples rarely tie)."""
    return [sum(ch.isdigit() for ch in c[:6]) / 6 for c in completions]


def bad_reward(prompts, completions, **columns):
    raise ValueError("the grader is down")


def write_recipe(tmp_path: Path, model_dir: str, prompts: list[dict], **sections) -> str:
    data_path = tmp_path / "prompts.jsonl"
    data_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    recipe = {
        "model": {"name_or_path": model_dir},
        "data": {"train": str(data_path), "max_length": 24, "max_prompt_length": 12},
        "loss": {"objective": "dpo"},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "rollout": {"num_generations": 4, "max_new_tokens": 6, "prompts_per_step": 4,
                    "rewards": [{"name": "test_cli_online:digit_share"}]},
        "eval": {"num_prompts": 4},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "micro_batch_size": 4,
                  "progress": False},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


PROMPTS = [{"prompt": f"q{i}:abc", "answer": str(i)} for i in range(8)]


def test_sample_label_train_eval(tmp_path, model_dir, capsys):
    recipe = write_recipe(tmp_path, model_dir, PROMPTS)
    samples, pairs = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    assert main(["sample", recipe, "-o", str(samples)]) == 0
    rows = read_jsonl(samples)
    assert len(rows) == 8 * 4 and set(rows[0]) == {"prompt", "completion", "prompt_id", "answer"}
    assert [r["prompt_id"] for r in rows[:5]] == [0, 0, 0, 0, 1] and rows[4]["answer"] == "1"

    assert main(["label", recipe, "-i", str(samples), "-o", str(pairs), "--format", "pairs"]) == 0
    labelled = read_jsonl(pairs)
    assert 4 <= len(labelled) <= 8
    for row in labelled:
        assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "answer"} <= set(row)
        assert row["score_chosen"] - row["score_rejected"] > 0.01
        assert row["answer"] == row["prompt"][1:row["prompt"].index(":")]  # the prompt's own columns

    capsys.readouterr()
    assert main(["train", recipe, f"data.train={pairs}"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out

    assert main(["eval", recipe, "--checkpoint", str(tmp_path / "run" / "final")]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["eval/num_prompts"] == 4.0
    for key in ("eval/reward", "eval/win_rate", "eval/mean_length", "eval/rewards/digit_share/mean"):
        assert key in metrics


@pytest.mark.parametrize("fmt,objective", [("binary", "kto"), ("groups", "grpo")])
def test_label_formats_are_training_data(tmp_path, model_dir, fmt, objective):
    chats = [{"prompt": [{"role": "user", "content": f"q{i}"}]} for i in range(6)]
    recipe = write_recipe(tmp_path, model_dir, chats, loss={"objective": objective})
    samples, out = tmp_path / "samples.jsonl", tmp_path / f"{fmt}.jsonl"
    assert main(["sample", recipe, "-o", str(samples)]) == 0
    assert read_jsonl(samples)[0]["completion"][0]["role"] == "assistant"  # chat prompts: chat completions
    assert main(["label", recipe, "-i", str(samples), "-o", str(out), "--format", fmt]) == 0
    examples, _ = prepare(str(out), objective, build_tokenizer(), max_prompt_length=12, max_length=24)
    assert examples
    if fmt == "groups":
        assert len(examples) == sum(1 for r in read_jsonl(samples) if r["completion"][0]["content"].strip())


def test_online_recipe_validates_and_trains(tmp_path, model_dir, capsys):
    recipe = write_recipe(tmp_path, model_dir, PROMPTS, loss={"objective": "grpo"},
                          rollout={"generate_every": 1}, eval={"generate": True, "num_prompts": 2})
    assert main(["validate", recipe]) == 0
    assert "ok: 8 prompts for grpo with generated samples" in capsys.readouterr().out
    assert main(["train", recipe]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 2] and "eval/win_rate" in lines[-1]
    assert sorted(p.name for p in (tmp_path / "run" / "rollouts").iterdir())[-1] == "round-00001.jsonl"


def test_failing_reward_exits_2_with_one_line(tmp_path, model_dir, capsys):
    recipe = write_recipe(tmp_path, model_dir, PROMPTS, rollout={
        "generate_every": 1, "rewards": [{"name": "test_cli_online:bad_reward"}]})
    assert main(["train", recipe]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers may draw a "Loading weights" bar before it)
    assert last.startswith("humanline: error: reward 'bad_reward' raised ValueError: the grader is down (prompt: ")
    assert "Traceback" not in err


def test_label_errors_are_one_line(tmp_path, model_dir, capsys):
    recipe = write_recipe(tmp_path, model_dir, PROMPTS)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "text": "b"}\n')
    assert main(["label", recipe, "-i", str(bad), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "missing column 'completion'" in capsys.readouterr().err
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n')
    assert main(["label", recipe, "-i", str(bad), "-o", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2, field 'completion'" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert main(["eval", recipe, "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
