"""`humanline arena --quick`: the whole pipeline (SFT, reward model, offline data, every arm, report) runs and
writes a complete, well-formed report. This checks the pipeline, not the paper's claim."""

from __future__ import annotations

import json
import math
from pathlib import Path

from humanline.cli import main


def test_quick_arena_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "arena"
    assert main(["arena", "--quick", "--output", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    for task in ("addition", "describe"):
        arms = {(r["objective"], r["arm"]) for r in runs if r["task"] == task}
        expected = {(o, a) for o in ("dpo", "kto", "grpo") for a in ("offline", "online", "humanline-offline")}
        assert expected | {("rft", "rft"), ("sft", "start")} <= arms
    for r in runs:
        # accuracy and win rate are both fractions
        assert 0.0 <= r["metric"] <= 1.0, r
        assert r["gen_time"] >= 0 and r["train_time"] >= 0
        if r["arm"] == "online":
            assert r["gen_time"] > 0
        if r["arm"] == "humanline-offline":
            assert 0.0 <= r["diagnostics"]["humanline/unclamped"] <= 1.0
            assert all(math.isfinite(v) for v in r["diagnostics"].values())
        if r["arm"] not in ("start",):
            assert r["history"] and r["history"][0]["step"] == 0
    md = (out / "results.md").read_text()
    assert "Verdicts" in md and "humanline-offline" in md
    for task in ("addition", "describe"):
        png = out / f"arena_{task}.png"
        assert png.stat().st_size > 10_000
    assert not list(out.glob("*.tmp*"))
