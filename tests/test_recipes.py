"""Every recipe in recipes/ loads and validates (no model or data loaded) and keeps the paper's settings.

The data-shape tests run each recipe's data settings (objective, column mapping) and its one-time conversion
snippet on a few rows shaped like the real hub data sets (tests/fixtures/), so a recipe cannot silently point at
columns that our formats do not read.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
import yaml

from humanline.config import Config, load_config
from humanline.data import load_rows, to_objective_rows

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ALL = sorted(p.name for p in RECIPES.glob("*.yaml"))

LLAMA = "meta-llama/Meta-Llama-3-8B-Instruct"
QWEN = "Qwen/Qwen2.5-1.5B-Instruct"
ARMORM_DATA = "princeton-nlp/llama3-ultrafeedback-armorm"

INSTRUCTION = ["dpo.yaml", "dpo-humanline.yaml", "kto.yaml", "kto-humanline.yaml", "grpo-online.yaml",
               "grpo-humanline.yaml", "sft.yaml"]
MATH = ["math-grpo-online.yaml", "math-grpo-offline64.yaml", "math-grpo-humanline64.yaml"]
HUMANLINE = ["dpo-humanline.yaml", "kto-humanline.yaml", "grpo-humanline.yaml", "math-grpo-humanline64.yaml",
             "tiny-dpo-humanline.yaml"]
# (normal, humanline): the same run but for the humanline switch (and the run folder).
TWINS = [("dpo.yaml", "dpo-humanline.yaml"), ("kto.yaml", "kto-humanline.yaml"),
         ("math-grpo-offline64.yaml", "math-grpo-humanline64.yaml")]


def recipe(name: str) -> Config:
    return load_config(RECIPES / name)


def test_the_expected_recipes_exist():
    assert set(ALL) == {*INSTRUCTION, *MATH, "tiny-dpo-humanline.yaml"}


@pytest.mark.parametrize("name", ALL)
def test_recipe_loads_and_validates(name):
    cfg = recipe(name)
    assert cfg.model.name_or_path and cfg.data.train
    assert cfg.train.output_dir == f"runs/{name.removesuffix('.yaml')}"
    # Only keys that exist: load_config refuses unknown ones, and no key is silently a string.
    raw = yaml.safe_load((RECIPES / name).read_text(encoding="utf-8"))
    assert isinstance(cfg.optim.lr, float) and raw["optim"]["lr"] == cfg.optim.lr


@pytest.mark.parametrize("name", ALL)
def test_recipe_header_says_what_it_mirrors_and_how_to_run_it(name):
    text = (RECIPES / name).read_text(encoding="utf-8")
    header = text[: text.index("\nmodel:")]
    assert all(line.startswith("#") or not line.strip() for line in header.splitlines())
    assert f"humanline train recipes/{name}" in header
    assert f"accelerate launch --config_file accelerate_configs/ddp.yaml -m humanline.cli train recipes/{name}" \
        in header
    assert (ROOT / "accelerate_configs" / "ddp.yaml").is_file()
    if name != "tiny-dpo-humanline.yaml":
        assert "Mirrors the paper" in header or "not an arm of the paper" in header


@pytest.mark.parametrize("name", ALL)
def test_humanline_recipes_have_humanline_and_a_synced_reference(name):
    cfg = recipe(name)
    if name in HUMANLINE:
        assert cfg.humanline.enabled and cfg.humanline.clip == "clamp"
        assert cfg.reference_mode == "sync" and not cfg.reference.precompute
        assert cfg.humanline.log_eps_P < 0 < cfg.humanline.log_eps_R
        assert cfg.humanline_bounds is not None
    else:
        assert not cfg.humanline.enabled and cfg.reference_mode == "frozen"


@pytest.mark.parametrize("name", INSTRUCTION)
def test_instruction_following_settings(name):
    cfg = recipe(name)
    assert cfg.model.name_or_path == LLAMA and cfg.model.dtype == "bfloat16"
    assert cfg.optim.lr == 1e-6 and cfg.optim.scheduler == "constant" and cfg.optim.warmup_ratio == 0.1
    assert cfg.train.max_steps == 312
    objective = cfg.loss.objective
    assert cfg.train.batch_size == {"dpo": 32, "sft": 32, "kto": 64, "grpo": 64}[objective]
    if objective in ("dpo", "kto"):
        assert cfg.loss.beta == 0.1
        assert cfg.data.train == cfg.data.eval == ARMORM_DATA
        assert (cfg.data.train_split, cfg.data.eval_split) == ("train", "test")
    if objective == "kto":
        assert cfg.loss.desirable_weight == 1.1 and cfg.loss.undesirable_weight == 1.0
    if name.endswith("humanline.yaml"):
        assert (cfg.humanline.log_eps_P, cfg.humanline.log_eps_R) == (-1.0, 1.5)
        assert cfg.reference.sync_every == 1
    if objective == "grpo":
        assert 0.01 <= cfg.loss.epsilon_low == cfg.loss.epsilon_high <= 0.15
        assert 0.005 <= cfg.loss.kl_beta <= 0.01


def test_online_grpo_samples_every_step_and_scores_with_armorm():
    cfg = recipe("grpo-online.yaml")
    r = cfg.rollout
    assert r.generate_every == 1 and r.reward_model == "RLHFlow/ArmoRM-Llama3-8B-v0.1" and not r.rewards
    assert r.prompts_per_step * r.num_generations == cfg.train.batch_size
    assert "trust_remote_code" in (RECIPES / "grpo-online.yaml").read_text()


def test_offline_humanline_grpo_reads_flattened_groups():
    cfg = recipe("grpo-humanline.yaml")
    assert cfg.rollout.generate_every == 0 and cfg.rollout.offline_source == "dataset"
    assert cfg.data.train == "data/ultrafeedback-armorm-groups.jsonl"


@pytest.mark.parametrize("name", MATH)
def test_math_settings(name):
    cfg = recipe(name)
    r = cfg.rollout
    assert cfg.model.name_or_path == QWEN
    assert cfg.loss.objective == "grpo" and cfg.loss.loss_type == "dapo"
    assert cfg.loss.epsilon_low == cfg.loss.epsilon_high == 0.2 and cfg.loss.kl_beta == 1e-4
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_ratio == 0.1 and cfg.optim.scheduler == "constant"
    assert cfg.train.max_steps == 1600 and cfg.train.batch_size == 256 == r.prompts_per_step * r.num_generations
    assert r.num_generations == 8 and r.temperature == 0.7 and r.max_new_tokens == 2048
    assert [(s.name, s.weight) for s in r.rewards] == [("math_verify", 8.0), ("format", 1.0)]
    assert r.generate_every == {"math-grpo-online.yaml": 1, "math-grpo-offline64.yaml": 64,
                                "math-grpo-humanline64.yaml": 64}[name]
    assert cfg.data.max_prompt_length + r.max_new_tokens <= cfg.data.max_length
    assert cfg.eval.generate and cfg.data.eval


def test_math_humanline_bounds_and_sync():
    cfg = recipe("math-grpo-humanline64.yaml")
    assert cfg.humanline_bounds == (-0.1, 1.0) and cfg.reference.sync_every == 16


def _without(cfg: Config, *sections: str) -> dict:
    d = cfg.to_dict()
    d["train"].pop("output_dir")
    for s in sections:
        d.pop(s)
    return d


@pytest.mark.parametrize("normal, humanline", TWINS)
def test_humanline_twins_differ_only_by_the_humanline_switch(normal, humanline):
    assert _without(recipe(normal), "humanline", "reference") == _without(recipe(humanline), "humanline",
                                                                            "reference")


def test_math_online_and_offline64_differ_only_by_the_generation_schedule():
    online, offline = recipe("math-grpo-online.yaml").to_dict(), recipe("math-grpo-offline64.yaml").to_dict()
    for d in (online, offline):
        d["train"].pop("output_dir")
        d["rollout"].pop("generate_every")
    assert online == offline


# --- the data settings against rows shaped like the hub data sets ----------------------------------------

def armorm_rows() -> datasets.Dataset:
    return load_rows(str(FIXTURES / "ultrafeedback_armorm_sample.jsonl"))


@pytest.mark.parametrize("name", ["dpo.yaml", "dpo-humanline.yaml", "kto.yaml", "kto-humanline.yaml",
                                  "sft.yaml"])
def test_hub_recipes_read_the_armorm_columns(name):
    cfg = recipe(name)
    rows = to_objective_rows(armorm_rows(), cfg.loss.objective, columns=cfg.data.columns, source="armorm")
    first = rows[0]
    user = [{"role": "user", "content": "Write a haiku about autumn."}]
    assert first["prompt"] == user  # the user turn, split off the whole conversation
    if cfg.loss.objective == "dpo":
        assert len(rows) == 3
        assert first["chosen"][0]["content"].startswith("Leaves drift")
        assert first["rejected"][0]["content"] == "Here is a haiku: autumn."
    elif cfg.loss.objective == "kto":
        assert len(rows) == 6 and rows["label"][:2] == [True, False]
    else:
        assert len(rows) == 3 and first["completion"][0]["role"] == "assistant"


def conversion_snippet(name: str) -> str:
    """The python snippet of a recipe's header (between `python - <<'PY'` and `PY`), uncommented."""
    lines = (RECIPES / name).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"#\s+python - <<'PY'", line))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "#   PY")
    return "\n".join(line[4:] for line in lines[start + 1:end])


def run_snippet(name: str, fixture: str, tmp_path, monkeypatch) -> list:
    """Run a recipe's conversion snippet offline: load_dataset returns the fixture rows."""
    rows = load_rows(str(FIXTURES / fixture)).remove_columns("__line__")
    calls = []

    def fake_load_dataset(repo, split=None, **kwargs):
        calls.append((repo, split))
        return rows

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.chdir(tmp_path)
    exec(compile(conversion_snippet(name), name, "exec"), {})  # noqa: S102 - our own recipe's snippet
    assert calls, "the snippet loads the hub data set"
    return calls


def test_grpo_humanline_conversion_gives_valid_groups(tmp_path, monkeypatch):
    calls = run_snippet("grpo-humanline.yaml", "ultrafeedback_armorm_sample.jsonl", tmp_path, monkeypatch)
    assert calls == [(ARMORM_DATA, "train")]
    cfg = recipe("grpo-humanline.yaml")
    path = tmp_path / cfg.data.train
    rows = to_objective_rows(load_rows(str(path)), "grpo", columns=cfg.data.columns, source=str(path))
    assert len(rows) == 15  # 3 prompts x 5 samples
    first = rows[0]
    assert first["prompt"] == [{"role": "user", "content": "Write a haiku about autumn."}]
    group = [r["advantage"] for r in rows if r["prompt_id"] == "p-001"]
    assert len(group) == 5 and abs(sum(group)) < 1e-6 and max(group) == group[0]  # best sample: largest


def test_grpo_online_conversion_gives_chat_prompts(tmp_path, monkeypatch):
    run_snippet("grpo-online.yaml", "ultrafeedback_armorm_sample.jsonl", tmp_path, monkeypatch)
    path = tmp_path / recipe("grpo-online.yaml").data.train
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3
    assert rows[1]["prompt"] == [{"role": "user", "content": "What is the capital of Australia?"}]


def test_math_conversion_gives_chat_prompts_and_answers(tmp_path, monkeypatch):
    from humanline.rewards import format_reward, math_verify_reward

    calls = run_snippet("math-grpo-online.yaml", "openaimath_sample.jsonl", tmp_path, monkeypatch)
    assert calls == [("simplescaling/openaimath", "train"), ("simplescaling/openaimath", "test")]
    cfg = recipe("math-grpo-online.yaml")
    for path in (cfg.data.train, cfg.data.eval):
        rows = [json.loads(line) for line in (tmp_path / path).read_text().splitlines()]
        assert [m["role"] for m in rows[0]["prompt"]] == ["system", "user"]
        assert "####" in rows[0]["prompt"][0]["content"]
    # A completion that follows the system prompt's instruction earns both rewards.
    completion = "1 plus 2 is 3.\n#### \\boxed{3}"
    assert format_reward()([rows[0]["prompt"]], [completion]) == [1.0]
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return
    answers = [rows[0]["answer"]]
    assert math_verify_reward([rows[0]["prompt"]], [completion], answer=answers) == [1.0]


def test_tiny_example_data_is_small_and_fits_the_tiny_recipe():
    from humanline.data import tokenize_dataset
    from humanline.tiny import build_tokenizer

    cfg = recipe("tiny-dpo-humanline.yaml")
    path = ROOT / cfg.data.train
    assert path.stat().st_size < 50_000
    rows = to_objective_rows(load_rows(str(path)), "dpo", source=str(path))
    assert len(rows) >= cfg.train.batch_size + cfg.data.eval_size
    examples, stats = tokenize_dataset(rows, build_tokenizer(), "dpo", max_prompt_length=cfg.data.max_prompt_length,
                                       max_length=cfg.data.max_length)
    assert stats.truncated_rows == 0 and len(examples) == len(rows)
    assert "save_tiny('tiny-model')" in (RECIPES / "tiny-dpo-humanline.yaml").read_text()
    assert cfg.model.name_or_path == "tiny-model"
