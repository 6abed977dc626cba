"""The arena's report: results.json, results.md and one PNG per task, all written atomically.

Input: either a list of run records or ``{"runs": [...], "sweeps": [...], "meta": {...}}``.

A run record::

    {"task": "addition", "objective": "dpo", "arm": "online", "seed": 0,
     "metric": 0.62,                       # final test metric, higher is better
     "history": [{"step": 0, "wall": 0.0, "metric": 0.31}, ...],
     "gen_time": 12.0, "train_time": 30.0, "lr": 1e-4,
     "diagnostics": {"humanline/unclamped": 0.9, "clip_ratio/region_mean": 0.1, ...},
     "metric_name": "greedy accuracy"}     # optional, names the y axis

The arms ``offline``, ``online``, ``humanline-offline`` and ``semi-online`` belong to an objective
(dpo / kto / grpo); the arms ``start`` (objective sft, the starting policy) and ``rft`` (the
rejection-fine-tuning control) are per task and drawn as reference lines.

A sweep record: ``{"task", "objective", "arm", "seed", "metric", "params": {"lr": ..., ...},
"selected": bool}``.

The verdict rule (``VERDICT_RULE``) is applied to the numbers, never written by hand.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OBJECTIVE_ARMS = ("online", "offline", "humanline-offline", "semi-online")
REFERENCE_ARMS = ("start", "rft")
OBJECTIVE_ORDER = ("sft", "rft", "dpo", "kto", "grpo")
ARM_ORDER = ("start", "rft", "offline", "online", "humanline-offline", "semi-online")
DIAGNOSTICS_ORDER = ("humanline/unclamped", "clip_ratio/region_mean", "logratio/abs_mean", "rewards/margins")
ARM_STYLE = {
    "online": {"color": "tab:blue", "label": "online"},
    "offline": {"color": "tab:orange", "label": "offline"},
    "humanline-offline": {"color": "tab:green", "label": "humanline on offline data"},
    "semi-online": {"color": "tab:purple", "label": "semi-online"},
}
REFERENCE_STYLE = {
    "start": {"color": "gray", "linestyle": "--", "label": "starting policy (SFT)"},
    "rft": {"color": "black", "linestyle": ":", "label": "RFT control"},
}
VERDICT_RULE = (
    "The claim is tested only where there is a gap to close: online must beat offline by more than the larger of "
    "the two arms' standard deviations over seeds (otherwise: not decided). There, humanline-offline matched "
    "online if its mean metric is at least online's, or if the gap |online - humanline| is at most the larger of "
    "the two arms' standard deviations (sample std; with one seed the spread is 0, so only humanline >= online "
    "counts). Higher metric is better."
)


# ------------------------------------------------------------------------------------------------
# Numbers.

def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _wall(run: Mapping[str, Any]) -> float:
    """A run's wall-clock: generation + training, else the last history point's wall."""
    if run.get("gen_time") is not None or run.get("train_time") is not None:
        return float(run.get("gen_time") or 0.0) + float(run.get("train_time") or 0.0)
    history = run.get("history") or []
    walls = [p["wall"] for p in history if p.get("wall") is not None]
    return float(walls[-1]) if walls else math.nan


def _normalise(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    if isinstance(results, Mapping):
        return {"runs": list(results.get("runs", [])), "sweeps": list(results.get("sweeps", [])),
                "meta": dict(results.get("meta", {}))}
    return {"runs": list(results), "sweeps": [], "meta": {}}


def _order(values: Iterable[str], preferred: Sequence[str]) -> list[str]:
    values = set(values)
    return [v for v in preferred if v in values] + sorted(values - set(preferred))


def group_stats(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean / std over seeds of metric, times and diagnostics, per (task, objective, arm)."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["task"], run["objective"], run["arm"]), []).append(run)
    rows = []
    for task in _order({k[0] for k in groups}, ()):
        for objective in _order({k[1] for k in groups if k[0] == task}, OBJECTIVE_ORDER):
            for arm in _order({k[2] for k in groups if k[:2] == (task, objective)}, ARM_ORDER):
                members = groups[(task, objective, arm)]
                mean, std = _mean_std([float(r["metric"]) for r in members])
                diag_keys = {k for r in members for k in (r.get("diagnostics") or {})}
                diagnostics = {k: _mean_std([float(r["diagnostics"][k]) for r in members
                                             if k in (r.get("diagnostics") or {})
                                             and r["diagnostics"][k] is not None])[0]
                               for k in diag_keys}
                rows.append({
                    "task": task, "objective": objective, "arm": arm, "n": len(members),
                    "seeds": sorted(r.get("seed") for r in members if r.get("seed") is not None),
                    "mean": mean, "std": std,
                    "gen_time": _mean_std([float(r["gen_time"]) for r in members
                                           if r.get("gen_time") is not None])[0],
                    "train_time": _mean_std([float(r["train_time"]) for r in members
                                             if r.get("train_time") is not None])[0],
                    "wall": _mean_std([_wall(r) for r in members])[0],
                    "lr": sorted({r["lr"] for r in members if r.get("lr") is not None}),
                    "diagnostics": diagnostics,
                })
    return rows


def verdict(online: Mapping[str, Any] | None, humanline: Mapping[str, Any] | None,
            offline: Mapping[str, Any] | None = None) -> tuple[bool | None, str]:
    """Apply ``VERDICT_RULE`` to the arms' stats; ``(None, reason)`` when an arm is missing or, given the
    offline arm, when online did not beat it (humanline cannot close a gap that is not there)."""
    if not online or not humanline or math.isnan(online["mean"]) or math.isnan(humanline["mean"]):
        return None, "not decided: the online or the humanline-offline arm is missing"
    gap = online["mean"] - humanline["mean"]
    spread = max(online["std"], humanline["std"])
    seeds = f"n={online['n']}/{humanline['n']} seeds" + (
        ", one seed: no spread measured" if max(online["n"], humanline["n"]) < 2 else "")
    if offline and not math.isnan(offline["mean"]):
        lead, lead_spread = online["mean"] - offline["mean"], max(online["std"], offline["std"])
        if lead <= lead_spread:
            return None, (f"not decided: online did not beat offline beyond the seeds' spread (online - offline = "
                          f"{lead:+.3f}, spread {lead_spread:.3f}), so there is no gap for humanline to close; "
                          f"for the record, online - humanline = {gap:+.3f} ({humanline['mean']:.3f} vs "
                          f"{online['mean']:.3f}; {seeds})")
    if gap <= 0:
        return True, (f"humanline-offline matched online: it scored {-gap:.3f} above online "
                      f"({humanline['mean']:.3f} vs {online['mean']:.3f}; {seeds})")
    if gap <= spread:
        return True, (f"humanline-offline matched online: gap online - humanline = {gap:+.3f} is within "
                      f"the seeds' spread {spread:.3f} ({humanline['mean']:.3f} vs {online['mean']:.3f}; {seeds})")
    return False, (f"humanline-offline did not match online: gap online - humanline = {gap:+.3f} exceeds the "
                   f"seeds' spread {spread:.3f} ({humanline['mean']:.3f} vs {online['mean']:.3f}; {seeds})")


def comparisons(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, objective): the arms' stats, gaps, humanline's speed-up and the verdict."""
    stats = group_stats(runs)
    by_key = {(s["task"], s["objective"], s["arm"]): s for s in stats}
    reference = {(s["task"], s["arm"]): s for s in stats if s["arm"] in REFERENCE_ARMS}
    out = []
    for s in stats:
        if s["arm"] in REFERENCE_ARMS or any(o["task"] == s["task"] and o["objective"] == s["objective"]
                                             for o in out):
            continue
        task, objective = s["task"], s["objective"]
        arms = {arm: by_key.get((task, objective, arm)) for arm in OBJECTIVE_ARMS}
        online, offline, humanline = arms["online"], arms["offline"], arms["humanline-offline"]
        held, text = verdict(online, humanline, offline)
        notes = []
        start = reference.get((task, "start"))
        if start and humanline and humanline["mean"] <= start["mean"]:
            notes.append("humanline-offline did not improve on the starting policy")
        out.append({
            "task": task, "objective": objective,
            "arms": {arm: st for arm, st in arms.items() if st},
            "start": start, "rft": reference.get((task, "rft")),
            "gap_online_offline": _diff(online, offline),
            "gap_online_humanline": _diff(online, humanline),
            "spread": max(online["std"], humanline["std"]) if online and humanline else math.nan,
            "speedup_humanline_vs_online": (online["wall"] / humanline["wall"]
                                            if online and humanline and humanline["wall"] > 0 else math.nan),
            "held": held, "verdict": text, "notes": notes,
        })
    return out


def _diff(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> float:
    return a["mean"] - b["mean"] if a and b else math.nan


def sweep_table(sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Sweep records grouped by (task, objective, arm, params): mean / std over seeds."""
    known = {"task", "objective", "arm", "seed", "metric", "params", "selected", "history"}
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for rec in sweeps:
        params = rec.get("params") or {k: v for k, v in rec.items() if k not in known}
        key = (rec.get("task", ""), rec.get("objective", ""), rec.get("arm", ""), _params_text(params))
        groups.setdefault(key, []).append(rec)
    rows = []
    for (task, objective, arm, params), members in sorted(groups.items()):
        mean, std = _mean_std([float(r["metric"]) for r in members])
        rows.append({"task": task, "objective": objective, "arm": arm, "params": params, "n": len(members),
                     "mean": mean, "std": std, "selected": any(r.get("selected") for r in members)})
    return rows


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_short(v)}" for k, v in sorted(params.items()))


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _pm(stats: Mapping[str, Any] | None) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f} (n={stats['n']})" if stats else "-"


# ------------------------------------------------------------------------------------------------
# Text.

def summary_text(results: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> str:
    """A few plain lines: one verdict per task and objective, with numbers and humanline's speed-up."""
    data = _normalise(results)
    lines = [f"Rule: {VERDICT_RULE}"]
    for c in comparisons(data["runs"]):
        arms = c["arms"]
        speed = c["speedup_humanline_vs_online"]
        line = (f"{c['task']} / {c['objective'].upper()}: {c['verdict']}. "
                f"online {_pm(arms.get('online'))}, humanline-offline {_pm(arms.get('humanline-offline'))}, "
                f"offline {_pm(arms.get('offline'))}")
        if c["start"]:
            line += f", start {_pm(c['start'])}"
        if not math.isnan(speed):
            line += f"; humanline-offline took {speed:.1f}x less wall-clock than online"
        lines.append(line + "." + "".join(f" Note: {n}." for n in c["notes"]))
    if len(lines) == 1:
        lines.append("No objective has both an online and a humanline-offline arm: nothing to compare.")
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> list[str]:
    if not rows:
        return [empty]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _markdown(data: Mapping[str, Any], stats: Sequence[Mapping[str, Any]],
              comps: Sequence[Mapping[str, Any]], sweeps: Sequence[Mapping[str, Any]],
              plots: Mapping[str, str]) -> str:
    meta = data["meta"]
    out = ["# Arena results", ""]
    if meta:
        out += ["Setup: " + "; ".join(f"{k} = {_short(v)}" for k, v in meta.items()
                                      if not isinstance(v, (dict, list)) or k == "seeds"), ""]
    out += ["## Verdicts", "", f"Rule: {VERDICT_RULE}", ""]
    for c in comps:
        speed = c["speedup_humanline_vs_online"]
        speed_text = ("" if math.isnan(speed)
                      else f" Speed-up of humanline-offline over online: {speed:.1f}x wall-clock.")
        notes = "".join(f" Note: {n}." for n in c["notes"])
        out.append(f"- **{c['task']} / {c['objective'].upper()}**: {c['verdict']}.{speed_text}{notes}")
    if not comps:
        out.append("- nothing to compare: no objective has online and humanline-offline arms.")

    out += ["", "## Online vs offline vs humanline", ""]
    rows = []
    for c in comps:
        a, speed = c["arms"], c["speedup_humanline_vs_online"]
        rows.append([c["task"], c["objective"], _pm(c["start"]), _pm(c["rft"]), _pm(a.get("offline")),
                     _pm(a.get("online")), _pm(a.get("humanline-offline")),
                     _fmt(c["gap_online_offline"], signed=True), _fmt(c["gap_online_humanline"], signed=True),
                     "-" if math.isnan(speed) else f"{speed:.2f}x", {True: "yes", False: "no", None: "-"}[c["held"]]])
    out += _table(["task", "objective", "start", "RFT", "offline", "online", "humanline-offline",
                   "online - offline", "online - humanline", "speed-up (online wall / humanline wall)", "matched?"],
                  rows, "No comparison.")

    diag_keys = _order({k for s in stats for k in s["diagnostics"]}, DIAGNOSTICS_ORDER)
    out += ["", "## Every arm", "",
            "Metric: mean ± sample std over seeds. Times in seconds, mean per run (wall = generation + training "
            "as each run recorded them).", ""]
    rows = [[s["task"], s["objective"], s["arm"], f"{_fmt(s['mean'])} ± {_fmt(s['std'])}", str(s["n"]),
             ", ".join(f"{x:.3g}" for x in s["lr"]) or "-", _fmt(s["gen_time"], 1), _fmt(s["train_time"], 1),
             _fmt(s["wall"], 1), *(_fmt(s["diagnostics"].get(k)) for k in diag_keys)] for s in stats]
    out += _table(["task", "objective", "arm", "metric", "n", "lr", "generation s", "training s", "wall s",
                   *diag_keys], rows, "No runs.")

    out += ["", "## Sweeps", ""]
    if sweeps:
        out += ["Mean ± std of the metric over the sweep's seeds; * marks the setting used in the comparison.", ""]
    rows = [[r["task"], r["objective"], r["arm"], r["params"], f"{_fmt(r['mean'])} ± {_fmt(r['std'])}",
             str(r["n"]), "*" if r["selected"] else ""] for r in sweeps]
    out += _table(["task", "objective", "arm", "settings", "metric", "n", "used"], rows, "No sweep was run.")

    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{task}]({name})" for task, name in plots.items()]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------
# Plots.

def _mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], x_key: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std over runs of metric(x), runs interpolated on the union of their x values."""
    curves = []
    for h in histories:
        pts = sorted((float(p[x_key]), float(p["metric"])) for p in h
                     if p.get(x_key) is not None and p.get("metric") is not None)
        if pts:
            curves.append((np.array([x for x, _ in pts]), np.array([y for _, y in pts])))
    if not curves:
        return np.array([]), np.array([]), np.array([])
    grid = np.unique(np.concatenate([x for x, _ in curves]))
    values = np.full((len(curves), len(grid)), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])  # no extrapolation beyond a run's own range
        values[i, inside] = np.interp(grid[inside], x, y)
    # Keep only x values every run reaches: where some runs have ended, the mean would jump.
    keep = ~np.isnan(values).any(axis=0)
    grid, values = grid[keep], values[:, keep]
    mean = values.mean(axis=0)
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)
    return grid, mean, std


def _task_figure(task: str, runs: Sequence[Mapping[str, Any]], comps: Sequence[Mapping[str, Any]]) -> Figure:
    objectives = _order({r["objective"] for r in runs if r["arm"] in OBJECTIVE_ARMS}, OBJECTIVE_ORDER)
    # The curves are validation-prompt evaluations, so the reference lines are too (the tables use test prompts).
    refs = {arm: _mean_std([float(r.get("val_metric", r["metric"])) for r in runs if r["arm"] == arm])
            for arm in REFERENCE_ARMS}
    metric_name = next((r["metric_name"] for r in runs if r.get("metric_name")), "test metric")
    seeds = sorted({r.get("seed") for r in runs if r.get("seed") is not None})
    verdicts = {c["objective"]: c for c in comps if c["task"] == task}

    cols = max(1, len(objectives))
    fig = Figure(figsize=(5.2 * cols, 8.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, cols, squeeze=False)
    handles: dict[str, Any] = {}
    for col, objective in enumerate(objectives):
        c = verdicts.get(objective)
        held = {True: "humanline MATCHED online", False: "humanline did NOT match online",
                None: "not decided"}[c["held"] if c else None]
        gap = c["gap_online_humanline"] if c else math.nan
        speed = c["speedup_humanline_vs_online"] if c else math.nan
        detail = []
        if not math.isnan(gap):
            detail.append(f"online - humanline = {gap:+.3f} (seed spread {c['spread']:.3f})")
        if not math.isnan(speed):
            detail.append(f"{speed:.1f}x faster")
        for row, (x_key, x_label) in enumerate((("step", "optimizer step"), ("wall", "wall-clock (s)"))):
            ax = axes[row][col]
            for arm in OBJECTIVE_ARMS:
                members = [r for r in runs if r["objective"] == objective and r["arm"] == arm]
                grid, mean, std = _mean_curve([r.get("history") or [] for r in members], x_key)
                if not len(grid):
                    continue
                style = ARM_STYLE[arm]
                (line,) = ax.plot(grid, mean, color=style["color"], label=style["label"], linewidth=1.8)
                ax.fill_between(grid, mean - std, mean + std, color=style["color"], alpha=0.18, linewidth=0)
                handles.setdefault(style["label"], line)
            for arm, (mean, _) in refs.items():
                if not math.isnan(mean):
                    style = REFERENCE_STYLE[arm]
                    line = ax.axhline(mean, color=style["color"], linestyle=style["linestyle"], linewidth=1.2)
                    handles.setdefault(style["label"], line)
            ax.set_xlabel(x_label)
            ax.set_ylabel(f"{metric_name}\n(validation prompts)")
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(f"{objective.upper()}: {held}\n" + ", ".join(detail), fontsize=10)
            else:
                ax.set_title(f"{objective.upper()} against wall-clock", fontsize=10)
    if not objectives:
        axes[0][0].text(0.5, 0.5, "no training runs", ha="center", va="center")
    fig.suptitle(f"Task '{task}': does humanline on offline data match online training?\n"
                 f"{metric_name} on validation prompts while training (higher is better; the tables use test prompts), "
                 f"mean over seeds {seeds} with ±1 std band", fontsize=12)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="outside lower center",
                   ncol=min(6, len(handles)), fontsize=9)
    return fig


# ------------------------------------------------------------------------------------------------
# Files.

def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a half-written file."""
    # A unique name opened with "xb" (not mkstemp, whose 0600 mode would stick to the final file).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(x: Any) -> Any:
    """NaN / inf become null (JSON has no NaN); tuples become lists; numpy scalars become floats."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text) or "task"


def write_report(results: Mapping[str, Any] | Sequence[Mapping[str, Any]], out_dir: str | os.PathLike
                 ) -> dict[str, Path]:
    """Write ``results.json``, ``results.md`` and ``arena_<task>.png`` per task into ``out_dir``.

    Returns the written paths by name (``json``, ``md``, and ``png:<task>``). Every file is written
    to a temporary name and renamed into place.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _normalise(results)
    stats = group_stats(data["runs"])
    comps = comparisons(data["runs"])
    sweeps = sweep_table(data["sweeps"])
    paths: dict[str, Path] = {}
    plots: dict[str, str] = {}
    for task in _order({r["task"] for r in data["runs"]}, ()):
        fig = _task_figure(task, [r for r in data["runs"] if r["task"] == task], comps)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        name = f"arena_{_slug(task)}.png"
        _atomic_write(out / name, buf.getvalue())
        paths[f"png:{task}"] = out / name
        plots[task] = name

    summary = {"rule": VERDICT_RULE, "arms": stats, "comparisons": comps, "sweeps": sweeps,
               "text": summary_text(data)}
    payload = {**data, "summary": summary}
    _atomic_write(out / "results.json", json.dumps(_jsonable(payload), indent=2, allow_nan=False).encode())
    _atomic_write(out / "results.md", _markdown(data, stats, comps, sweeps, plots).encode())
    paths["json"], paths["md"] = out / "results.json", out / "results.md"
    return paths
