"""Shared helpers of the benchmarks: model sizes, synthetic data, timing statistics, memory, the environment.

Nothing here is timed itself. The data are random character strings (the tiny tokenizer is character-level,
so a string of n characters is n tokens and the lengths below are exact token counts).
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # runs from a checkout without `pip install -e .` too
    sys.path.insert(0, str(ROOT / "src"))

# hidden / layers / ffn / heads, as in docs FACTS.md (character vocabulary of 93 tokens)
SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=128, num_layers=4, intermediate_size=512, num_heads=4),
    "5m": dict(hidden_size=256, num_layers=5, intermediate_size=1024, num_heads=4),
    "20m": dict(hidden_size=512, num_layers=6, intermediate_size=1536, num_heads=8),
}

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 "  # no character of any special token


# --------------------------------------------------------------------------------------- environment

def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def environment(threads: int) -> dict[str, Any]:
    """Machine and versions, for the report."""
    import accelerate
    import transformers

    info: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "accelerate": accelerate.__version__,
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": threads,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "load_average": [round(x, 2) for x in load_average()],
    }
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------------------ models

def model_dir(size: str, root: str | None = None, seed: int = 0) -> str:
    """A saved tiny tokenizer + Llama of ``size`` (built once per root). TRL loads its reference model from
    ``config._name_or_path``, so every contender loads the policy from this folder."""
    from humanline.tiny import save_tiny

    root = root or os.path.join(tempfile.gettempdir(), "humanline-bench-models")
    path = os.path.join(root, f"{size}-seed{seed}")
    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root)
        save_tiny(tmp, seed=seed, max_positions=1024, **SIZES[size])
        try:
            os.replace(tmp, path)
        except OSError:  # another process won the race
            pass
    return path


def load_model(path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device())


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -------------------------------------------------------------------------------------------- data

def _text(r: random.Random, n: int) -> str:
    return "".join(r.choice(ALPHABET) for _ in range(n))


def _lengths(r: random.Random, seq_len: int, fixed: bool) -> tuple[int, int]:
    """(prompt characters, completion characters); the completion gets one EOS token on top."""
    if fixed:
        p = seq_len // 4
        return p, seq_len - p - 1
    total = r.randint(3 * seq_len // 4, seq_len)
    p = r.randint(seq_len // 8, 3 * seq_len // 8)
    return p, total - p - 1


@dataclass
class Data:
    """Rows in TRL's formats for ``steps`` distinct batches (batch i = rows[i * per_step:(i + 1) * per_step])."""

    objective: str
    rows: list[dict[str, Any]]
    per_step: int
    steps: int
    group: int = 1  # GRPO completions per prompt
    info: dict[str, Any] = field(default_factory=dict)

    def batch(self, i: int) -> list[dict[str, Any]]:
        i %= self.steps
        return self.rows[i * self.per_step:(i + 1) * self.per_step]


def make_data(objective: str, batch: int, seq_len: int, steps: int, *, group: int = 8, fixed: bool = False,
              seed: int = 0) -> Data:
    """``steps`` batches of ``batch`` examples (pairs for DPO, completions for GRPO in groups of ``group``).

    Every sequence (prompt + completion + EOS) has at most ``seq_len`` tokens: total lengths are uniform in
    [3/4, 1] x seq_len and prompts in [1/8, 3/8] x seq_len (``fixed``: all exactly seq_len, prompt seq_len/4).
    """
    r = random.Random(seed)
    rows: list[dict[str, Any]] = []
    if objective == "grpo":
        if batch % group:
            raise ValueError(f"batch {batch} is not a multiple of the group size {group}")
        for g in range(steps * batch // group):
            p, _ = _lengths(r, seq_len, fixed)
            prompt = _text(r, p)
            for j in range(group):
                _, c = _lengths(r, seq_len, fixed)
                c = min(c, seq_len - p - 1)
                rows.append({"prompt": prompt, "completion": _text(r, c), "score": float(r.random() < 0.5) + 0.1 * j,
                             "prompt_id": g})
    else:
        for i in range(steps * batch):
            p, c = _lengths(r, seq_len, fixed)
            prompt = _text(r, p)
            if objective == "dpo":
                _, c2 = _lengths(r, seq_len, fixed)
                c2 = min(c2, seq_len - p - 1)
                rows.append({"prompt": prompt, "chosen": _text(r, c), "rejected": _text(r, c2)})
            elif objective == "kto":
                rows.append({"prompt": prompt, "completion": _text(r, c), "label": i % 2 == 0})
            else:
                raise ValueError(f"unknown objective {objective!r}")
    return Data(objective, rows, batch, steps, group=group if objective == "grpo" else 1)


def count_tokens(rows: list[dict[str, Any]], objective: str) -> int:
    """Prompt + response tokens trained on with gradient in a batch (EOS included; KTO's KL rows excluded:
    every contender forwards them without gradient)."""
    if objective == "dpo":
        return sum(2 * len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) + 2 for r in rows)
    return sum(len(r["prompt"]) + len(r["completion"]) + 1 for r in rows)


# -------------------------------------------------------------------------------------- statistics

@dataclass
class Series:
    """Seconds per step of one contender."""

    times: list[float] = field(default_factory=list)

    def add(self, t: float) -> None:
        self.times.append(t)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    def quantiles(self) -> tuple[float, float]:
        if len(self.times) < 2:
            return self.median, self.median
        q = statistics.quantiles(self.times, n=4, method="inclusive")
        return q[0], q[2]

    def summary(self) -> dict[str, float]:
        q1, q3 = self.quantiles()
        return {"median_s": self.median, "q1_s": q1, "q3_s": q3, "min_s": min(self.times, default=float("nan")),
                "max_s": max(self.times, default=float("nan")), "n": len(self.times)}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def trl_optimizer_step(t: Any, model: torch.nn.Module, batch: Any) -> None:
    """One optimizer step of a TRL trainer ``t``, exactly as ``transformers.Trainer`` runs it (training step,
    clipping, optimizer and scheduler step, and the step callbacks, e.g. TRL's reference sync), minus the
    dataloader: the benchmarks feed the batch themselves."""
    t.current_gradient_accumulation_steps = 1
    t.accelerator.gradient_state._set_sync_gradients(True)
    t.control = t.callback_handler.on_step_begin(t.args, t.state, t.control)
    t._tr_loss += t.training_step(model, batch, None)
    t._get_grad_norm(model, grad_norm=t._clip_grad_norm(model))
    t.control = t.callback_handler.on_pre_optimizer_step(t.args, t.state, t.control)
    t.optimizer.step()
    t.control = t.callback_handler.on_optimizer_step(t.args, t.state, t.control)
    t.lr_scheduler.step()
    model.zero_grad()
    t.state.global_step += 1
    t.control = t.callback_handler.on_step_end(t.args, t.state, t.control)


def paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and IQR of the per-round ratios a[i] / b[i] (steps measured side by side in the same round)."""
    ratios = [x / y for x, y in zip(a, b) if y > 0]
    if not ratios:
        return (float("nan"),) * 3
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q = statistics.quantiles(ratios, n=4, method="inclusive")
    return statistics.median(ratios), q[0], q[2]


# ------------------------------------------------------------------------------------------ memory

def rss_mb() -> float:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process: VmHWM of /proc/self/status (Linux), else ru_maxrss.

    Not ru_maxrss on Linux: a child started by fork/exec inherits the parent's high-water mark in it (exec
    records the old address space's peak), so a small child of a large parent would report the parent's peak.
    VmHWM belongs to the process's own address space, and `reset_peak_rss` can lower it to the current RSS.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: ``5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# For memory children: glibc's default *dynamic* mmap threshold keeps freed large blocks in the heap, so a
# process's RSS then depends on its allocation history (+-50 MiB run to run here). A fixed threshold returns every
# large tensor to the OS when it is freed: RSS follows the live tensors and repeats to the MiB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(args: list[str], timeout: float = 1800, env_extra: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh process; its last stdout line is a JSON object."""
    env = dict(os.environ)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"child {' '.join(args)} failed ({proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


def quiet() -> None:
    """Silence the libraries' progress bars and warnings (they would only add noise to the tables)."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    warnings.filterwarnings("ignore")
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def fmt_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
