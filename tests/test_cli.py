"""The command line's contract.

Exit code 0 on success; 2 for bad input or configuration, with ONE stderr line naming the file, the line or row
and the field (or the key), no traceback unless ``--debug``, and nothing written (no run folder, no file);
1 for anything unexpected. Most tests call ``humanline.cli.main`` in-process; a few run the real
``python -m humanline.cli`` to check the exit codes and the stderr a shell sees.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import yaml

from humanline.cli import main
from humanline.config import load_config
from humanline.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny-dpo-humanline.yaml"
TINY_PAIRS = ROOT / "examples" / "tiny_pairs.jsonl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny(str(tmp_path_factory.mktemp("cli") / "model"), hidden_size=64, num_layers=2)


@pytest.fixture(autouse=True)
def one_thread():
    # On a shared 2-core machine, one thread per process beats two fighting threads by far.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


PAIRS = TINY_PAIRS.read_bytes().splitlines(keepends=True)[:8]
USER = {"role": "user", "content": "hi"}
REPLY = {"role": "assistant", "content": "yo"}
PAIR = {"prompt": "Say hi.", "chosen": "hi", "rejected": "no"}
KTO = {"prompt": "Say hi.", "completion": "hi", "label": True}
GRPO = [{"prompt": "p", "completion": "a", "score": 1.0}, {"prompt": "p", "completion": "b", "score": 0.0}]


def write_config(tmp_path: Path, tiny: str, text: str | None = None) -> str:
    """A good tiny DPO config (8 pairs in pairs.jsonl, output_dir tmp_path/run), or ``text`` as the config."""
    (tmp_path / "pairs.jsonl").write_bytes(b"".join(PAIRS))
    if text is None:
        text = yaml.safe_dump({
            "model": {"name_or_path": tiny},
            "data": {"train": str(tmp_path / "pairs.jsonl"), "max_prompt_length": 48, "max_length": 96},
            "loss": {"objective": "dpo"},
            "humanline": {"enabled": True},
            "optim": {"lr": 1.0e-4},
            "train": {"output_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 4, "micro_batch_size": 4,
                      "progress": False},
        })
    path = tmp_path / "cfg.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


# --- the corpus of bad inputs ----------------------------------------------------------------------------

@dataclass
class Bad:
    id: str
    expect: list[str]  # parts of the one error line; {tmp} is the test folder, {cfg} the config file
    overrides: list[str] = field(default_factory=list)  # {tmp} expanded
    files: dict[str, bytes] = field(default_factory=dict)  # written into the test folder first
    config: str | None = None  # the whole config file instead of the good one


BAD = [
    # data
    Bad("dpo missing column", ["{tmp}/bad.jsonl", "line 1", "field 'rejected'", "missing column"],
        ["data.train={tmp}/bad.jsonl"], {"bad.jsonl": jsonl({"prompt": "p", "chosen": "c"})}),
    Bad("invalid JSON on line 3", ["{tmp}/bad.jsonl", "line 3", "invalid JSON"],
        ["data.train={tmp}/bad.jsonl"], {"bad.jsonl": jsonl(PAIR, PAIR) + b'{"prompt": "p", "chosen": \n'}),
    Bad("empty chosen reply", ["{tmp}/bad.jsonl", "line 2", "field 'chosen[0].content'", "empty"],
        ["data.train={tmp}/bad.jsonl"],
        {"bad.jsonl": jsonl({"prompt": [USER], "chosen": [REPLY], "rejected": [REPLY]},
                            {"prompt": [USER], "chosen": [{**REPLY, "content": " "}], "rejected": [REPLY]})}),
    Bad("chosen reply from the user", ["{tmp}/bad.jsonl", "line 1", "field 'chosen[0].role'", "'assistant'"],
        ["data.train={tmp}/bad.jsonl"], {"bad.jsonl": jsonl({"prompt": [USER], "chosen": [USER],
                                                             "rejected": [REPLY]})}),
    Bad("null prompt", ["{tmp}/bad.jsonl", "line 2", "field 'prompt'", "missing"],
        ["data.train={tmp}/bad.jsonl"], {"bad.jsonl": jsonl(PAIR, {**PAIR, "prompt": None})}),
    Bad("not UTF-8", ["{tmp}/bad.jsonl", "line 2", "UTF-8"],
        ["data.train={tmp}/bad.jsonl"], {"bad.jsonl": jsonl(PAIR) + b'{"prompt": "caf\xe9"}\n'}),
    Bad("kto label as text", ["{tmp}/bad.jsonl", "line 1", "field 'label'", "boolean"],
        ["loss.objective=kto", "data.train={tmp}/bad.jsonl"],
        {"bad.jsonl": jsonl({**KTO, "label": "yes"}, {**KTO, "label": "no"})}),
    Bad("kto label 0/1", ["{tmp}/bad.jsonl", "line 1", "field 'label'", "0/1"],
        ["loss.objective=kto", "data.train={tmp}/bad.jsonl"],
        {"bad.jsonl": jsonl(*[{**KTO, "label": i % 2} for i in range(4)])}),
    Bad("grpo group of one", ["{tmp}/bad.jsonl", "line 3", "field 'prompt'", "size 1"],
        ["loss.objective=grpo", "data.train={tmp}/bad.jsonl"],
        {"bad.jsonl": jsonl(*GRPO, {"prompt": "q", "completion": "a", "score": 1.0})}),
    Bad("grpo NaN score", ["{tmp}/bad.jsonl", "line 2", "field 'score'", "finite"],
        ["loss.objective=grpo", "data.train={tmp}/bad.jsonl"],
        {"bad.jsonl": jsonl(GRPO[0], {**GRPO[1], "score": math.nan})}),
    Bad("sft last message from the user", ["{tmp}/bad.jsonl", "line 1", "field 'messages[1].role'"],
        ["loss.objective=sft", "humanline.enabled=false", "data.train={tmp}/bad.jsonl"],
        {"bad.jsonl": jsonl({"messages": [USER, USER]})}),
    Bad("column mapping to a missing column", ["{tmp}/pairs.jsonl", "line 1", "field 'better'", "missing column"],
        ["data.columns.chosen=better"]),
    Bad("broken eval file", ["{tmp}/eval.jsonl", "line 2", "invalid JSON"],
        ["data.eval={tmp}/eval.jsonl"], {"eval.jsonl": jsonl(PAIR) + b"{oops\n"}),
    Bad("data file not found", ["{tmp}/missing.jsonl", "not found"], ["data.train={tmp}/missing.jsonl"]),
    Bad("unsupported file type", ["{tmp}/bad.txt", "unsupported file type"],
        ["data.train={tmp}/bad.txt"], {"bad.txt": b"prompt,chosen\n"}),
    Bad("JSON array element not an object", ["{tmp}/bad.json", "row 1", "JSON object"],
        ["data.train={tmp}/bad.json"], {"bad.json": json.dumps([PAIR, "x"]).encode()}),
    Bad("empty data file", ["{tmp}/bad.jsonl", "empty"], ["data.train={tmp}/bad.jsonl"], {"bad.jsonl": b""}),
    Bad("fewer rows than one batch", ["{tmp}/pairs.jsonl", "8 examples", "key 'train.batch_size'"],
        ["train.batch_size=64"]),
    Bad("model folder not found", ["{tmp}/no-model", "not found"], ["model.name_or_path={tmp}/no-model"]),
    # config
    Bad("YAML syntax error", ["{cfg}", "line 4", "mapping values are not allowed"],
        config="model:\n  name_or_path: m\ndata:\n  train: data: jsonl\n"),
    Bad("unknown key in the file", ["{cfg}", "key 'loss.betta'", "unknown key"],
        config="model: {name_or_path: m}\ndata: {train: d.jsonl}\nloss: {betta: 0.1}\n"),
    Bad("top level not a mapping", ["{cfg}", "top level must be a mapping"], config="- model\n- data\n"),
    Bad("beta 0", ["{cfg}", "key 'loss.beta'", "> 0"], ["loss.beta=0"]),
    Bad("log_eps_P >= log_eps_R", ["{cfg}", "key 'humanline.log_eps_P'"], ["humanline.log_eps_P=2.0"]),
    Bad("sync_every 0", ["{cfg}", "key 'reference.sync_every'", ">= 1"], ["reference.sync_every=0"]),
    Bad("lr 0", ["{cfg}", "key 'optim.lr'"], ["optim.lr=0"]),
    Bad("warmup_ratio 1", ["{cfg}", "key 'optim.warmup_ratio'"], ["optim.warmup_ratio=1"]),
    Bad("max_steps not a number", ["{cfg}", "key 'train.max_steps'", "integer"], ["train.max_steps=many"]),
    Bad("precompute with humanline", ["{cfg}", "key 'reference.precompute'"], ["reference.precompute=true"]),
    Bad("sft with humanline", ["{cfg}", "key 'loss.objective'"], ["loss.objective=sft"]),
    Bad("online without rewards", ["{cfg}", "key 'rollout.rewards'"], ["rollout.generate_every=1"]),
    Bad("resume from a missing checkpoint", ["{cfg}", "key 'train.resume_from'"],
        ["train.resume_from={tmp}/nope"]),
    Bad("override without '='", ["command line", "'oops'"], ["oops"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: Bad, tiny, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny, case.config)
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    before = snapshot(tmp_path)
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in case.overrides]

    code = main(["train", cfg, *overrides])

    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("humanline: error: "), err
    assert "Traceback" not in err and out == ""
    for part in case.expect:
        assert part.replace("{tmp}", str(tmp_path)).replace("{cfg}", cfg) in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
    assert snapshot(tmp_path) == before, "nothing half-written"


def test_the_corpus_is_large_and_mixed():
    assert len(BAD) >= 15
    assert sum("{cfg}" in " ".join(c.expect) for c in BAD) >= 8
    assert sum("line" in " ".join(c.expect) for c in BAD) >= 10


@pytest.mark.parametrize("argv", [["--debug", "train"], ["train"]], ids=["before", "after"])
def test_debug_shows_the_traceback(argv, tiny, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny)
    extra = ["--debug"] if argv == ["train"] else []
    assert main([*argv, cfg, "loss.beta=0", *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert err.splitlines()[-1].startswith("humanline: error: ") and "key 'loss.beta'" in err


def test_unexpected_errors_exit_1_with_a_hint(tiny, tmp_path, capsys, monkeypatch):
    import humanline.run

    def boom(cfg):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(humanline.run, "validate", boom)
    assert main(["validate", write_config(tmp_path, tiny)]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == ["humanline: RuntimeError: disk on fire (run with --debug for the traceback)"]


# --- success ---------------------------------------------------------------------------------------------

def test_validate_checks_data_and_writes_nothing(tiny, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny)
    before = snapshot(tmp_path)
    assert main(["validate", cfg]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "ok: 8 dpo examples (0 truncated), 0 eval examples"
    assert snapshot(tmp_path) == before


def test_train_the_tiny_recipe(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = [f"model.name_or_path={tiny}", f"data.train={TINY_PAIRS}", f"train.output_dir={run}",
                 "train.max_steps=3", "train.log_every=1", "train.progress=false"]
    assert main(["train", str(TINY_RECIPE), *overrides]) == 0
    assert f"trained 3 steps; final model in {run / 'final'}" in capsys.readouterr().out

    # The resolved config, re-loadable as is.
    assert load_config(run / "config.yaml") == load_config(TINY_RECIPE, overrides)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and "humanline/unclamped" in r for r in steps)
    assert any("eval/loss" in r for r in records)  # data.eval_size: 16 held-out pairs, evaluated at the end
    final = run / "final"
    assert list(final.glob("*.safetensors")) and (final / "config.json").is_file()
    assert (final / "tokenizer.json").is_file()


# --- the real command, in a subprocess -------------------------------------------------------------------

def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "humanline.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_subprocess_exit_codes(tiny, tmp_path):
    cfg = write_config(tmp_path, tiny)
    ok = cli("validate", cfg, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 8 dpo examples")

    (tmp_path / "bad.jsonl").write_bytes(jsonl(PAIR) + b"{not json\n")
    bad = cli("train", cfg, f"data.train={tmp_path / 'bad.jsonl'}", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [f"humanline: error: {tmp_path / 'bad.jsonl'}, line 2: invalid JSON at "
                                       "column 2: Expecting property name enclosed in double quotes"]
    assert not (tmp_path / "run").exists()

    # A config error fails before the heavy imports; --debug (either side of the command) adds the traceback.
    debug = cli("--debug", "train", cfg, "reference.sync_every=0", cwd=tmp_path)
    assert debug.returncode == 2
    assert "Traceback (most recent call last)" in debug.stderr and "ConfigError" in debug.stderr
    assert debug.stderr.splitlines()[-1] == (f"humanline: error: {cfg} (with command-line overrides), "
                                             "key 'reference.sync_every': must be >= 1, got 0")
    assert not (tmp_path / "run").exists()
