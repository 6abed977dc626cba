"""The arena's pipeline: starting policy, offline data, arms, sweeps, seeds, report.

Per task (``addition``: verifiable; ``describe``: judged by a hidden gold function through a learned reward
model), everything runs through the library's own trainer:

1. SFT makes the starting policy (cached in the run folder, reused by every arm);
2. offline data: samples from the starting policy, scored once by the training reward, built into pairs /
   binary rows / groups (the paper's setting);
3. arms with the same number of optimizer steps and examples per step: for each of DPO, KTO and GRPO,
   offline, online and humanline-offline (semi-online in ``--full``), plus a rejection-fine-tuning control
   (SFT on the best offline samples);
4. learning rates (and humanline's ``sync_every`` and clip bounds) picked per arm on the validation prompts,
   on seed 0; the other seeds rerun the chosen settings; test prompts only for the reported numbers.

Jobs run in worker processes (one torch thread each: tiny models run best that way), as many as cores.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..errors import HumanlineError

OBJECTIVES = ("dpo", "kto", "grpo")


@dataclass(frozen=True)
class Preset:
    """Sizes of an arena run; ``default`` is sized to finish in under 15 minutes on 2 cores (12.7 min measured).

    Steps and offline prompts are per task. Addition needs steps for fresh samples to pay off: at 30 steps of 4
    prompts online beat offline by only 0.02-0.04 accuracy (within the seeds' spread), at 40-60 steps by 0.11-0.22.
    A describe step costs about twice an addition step (longer responses), so it gets fewer.
    """

    seeds: int = 2
    steps: dict[str, int] = field(default_factory=lambda: {"addition": 40, "describe": 16})
    prompts_per_step: int = 4
    num_generations: int = 8
    evals: int = 2  # validation evaluations during a run (evenly spaced; the last one at the end)
    val_prompts: int = 48
    test_prompts: int = 128
    # prompts sampled once for the offline data (num_generations samples each)
    offline_prompts: dict[str, int] = field(default_factory=lambda: {"addition": 400, "describe": 240})
    sweep: bool = True
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=lambda: {
        k: (3e-5, 1e-4) for k in ("dpo", "kto", "grpo", "rft")})
    # (sync_every, log_eps_P, log_eps_R): the first at every learning rate, the others at humanline's best one
    humanline_grid: tuple[tuple[int, float, float], ...] = ((1, -1.0, 1.5), (4, -0.1, 1.0))
    semi_online: int = 0  # generate_every of a semi-online arm (0: no such arm)
    tasks: tuple[str, ...] = ("addition", "describe")
    # Task sizes: responses of tens of tokens (per-token effects can show) but short enough for a CPU.
    task_options: dict[str, dict[str, int]] = field(default_factory=lambda: {
        "addition": {"digits": 3}, "describe": {"length_lo": 20, "length_hi": 60, "max_sentences": 2}})
    sft_max_steps: int = 1500
    sft_target: float = 0.40  # addition: stop SFT once greedy validation accuracy reaches this
    describe_sft_steps: int = 100
    rm_steps: int = 100


PRESETS: dict[str, Preset] = {
    "quick": Preset(seeds=1, steps={"addition": 6, "describe": 6}, prompts_per_step=4, num_generations=4, evals=2,
                    val_prompts=16, test_prompts=32, offline_prompts={"addition": 48, "describe": 48}, sweep=False,
                    sft_max_steps=400, describe_sft_steps=30, rm_steps=20, sft_target=0.15,
                    task_options={"addition": {"digits": 2},
                                  "describe": {"length_lo": 20, "length_hi": 60, "max_sentences": 2}}),
    "default": Preset(),
    "full": Preset(seeds=5, steps={"addition": 200, "describe": 200}, prompts_per_step=8, evals=8, val_prompts=128,
                   test_prompts=500, offline_prompts={"addition": 1600, "describe": 1600}, semi_online=8,
                   lr_grid={k: (1e-5, 3e-5, 1e-4, 3e-4) for k in ("dpo", "kto", "grpo", "rft")},
                   humanline_grid=((1, -1.0, 1.5), (4, -1.0, 1.5), (16, -0.1, 1.0), (4, -1.5, 1.5))),
}

# Fixed values for --quick (no sweep), and the centre of the default grids.
DEFAULT_LR = {"dpo": 1e-4, "kto": 1e-4, "grpo": 1e-4, "rft": 1e-4}


# ------------------------------------------------------------------------------------------------------------
# Jobs: plain functions of JSON-able specs, run in worker processes.

def _setup_worker() -> None:
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _task(name: str, p: Preset) -> Any:
    from .tasks import make_task

    return make_task(name, **p.task_options.get(name, {}))


def _max_new_tokens(task: Any) -> int:
    """Room for the longest well-formed response, so that length is the policy's choice, not a cut."""
    if task.name == "addition":
        return 14 * (task.digits + 1) + 12
    return task.length_hi + 24


def _training_reward(task_name: str, task_dir: Path, p: Preset) -> Callable[..., list[float]]:
    task = _task(task_name, p)
    if task_name == "addition":
        return task.reward
    from .reward_model import RewardModel

    return RewardModel.load(task_dir / "reward_model")


def _eval_reward(task_name: str, p: Preset) -> Callable[..., list[float]]:
    task = _task(task_name, p)
    return task.reward if task_name == "addition" else task.gold_score


def _evaluator(task_name: str, task_dir: Path, tok: Any, split: str, n: int, baseline: bool, p: Preset) -> Any:
    """Greedy generation on ``n`` prompts of ``split``: accuracy (addition) or gold win rate vs the start."""
    from ..evaluation import GenerationEvaluator
    from ..rewards import RewardSet

    task = _task(task_name, p)
    rows = task.sample_prompts(n, seed=0, split=split)
    reward = _eval_reward(task_name, p)
    ev = GenerationEvaluator(rows, RewardSet([reward]), tok, max_new_tokens=_max_new_tokens(task),
                             temperature=0.0, num_prompts=n, batch_size=256, seed=0, max_prompt_length=64,
                             accuracy=True if task_name == "addition" else None,
                             baseline_path=task_dir / f"baseline-{split}.jsonl" if baseline else None)
    return ev  # the baseline (the starting policy's outputs) is read from baseline_path at the first call


def _metric(task_name: str, metrics: dict[str, float]) -> float:
    return metrics["eval/accuracy"] if task_name == "addition" else metrics["eval/win_rate"]


def _tokenizer(task_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(task_dir / "sft"))


def _train_start(task_name: str, task: Any, tok: Any, task_dir: Path, p: Preset, info: dict[str, Any]) -> Any:
    """SFT the starting policy (and, for describe, train the reward model first); saved to ``task_dir/sft``."""
    import torch

    from ..config import config_from_dict
    from ..models import save_model
    from ..run import prepare_offline
    from ..tiny import build_model
    from ..trainer import DatasetSource, Trainer

    if task_name == "describe":
        from .reward_model import train_reward_model

        rm = train_reward_model(task, tok, steps=p.rm_steps, seed=0)
        rm.save(task_dir / "reward_model")
        info["reward_model"] = asdict(rm.report) if hasattr(rm, "report") and rm.report is not None else {}

    # 1. SFT: the starting policy.
    torch.manual_seed(0)
    model = build_model(tok, hidden_size=128, num_layers=4, seed=0)
    sft_rows = task.sft_rows(6000, seed=0, split="train")
    cfg = config_from_dict({
        "model": {"name_or_path": "arena-tiny"}, "data": {"train": "sft", "max_prompt_length": 48, "max_length": 176},
        "loss": {"objective": "sft"}, "optim": {"lr": 1e-3, "warmup_ratio": 0.05, "scheduler": "constant"},
        "eval": {"every": 25},
        "train": {"max_steps": p.sft_max_steps if task_name == "addition" else p.describe_sft_steps,
                  "batch_size": 32, "micro_batch_size": 32, "seed": 0, "output_dir": str(task_dir / "sft-run"),
                  "progress": False, "save_final": False}})
    examples, _, _ = prepare_offline(cfg, tok, sft_rows)
    stop = None
    evaluators = []
    if task_name == "addition":
        val_eval = _evaluator(task_name, task_dir, tok, "validation", p.val_prompts, baseline=False, p=p)
        evaluators.append(lambda m, step: val_eval(m, step))
        stop = (lambda metrics: metrics.get("eval/accuracy", -1.0) >= p.sft_target) if p.sft_target > 0 else None
    trainer = Trainer(cfg, model, tok, DatasetSource(examples, 32, 0), evaluators=evaluators, stop_when=stop)
    result = trainer.train()
    save_model(result.model, tok, str(task_dir / "sft"))
    info["sft_steps"] = result.step

    return result.model


def prepare_task(spec: dict[str, Any]) -> dict[str, Any]:
    """SFT the starting policy (and train the reward model), then sample and score the offline data."""
    _setup_worker()

    from ..config import config_from_dict
    from ..data import encode_completion
    from ..rollout.hf import HFGenerator
    from ..rollout.schedule import rows_from_rollouts
    from ..tiny import build_tokenizer

    p = Preset(**spec["preset"])
    task_name, task_dir = spec["task"], Path(spec["dir"])
    task = _task(task_name, p)
    task_dir.mkdir(parents=True, exist_ok=True)
    info_path = task_dir / "prepared.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    t0 = time.perf_counter()
    tok = build_tokenizer()
    info: dict[str, Any] = {"task": task_name}
    sft_info_path = task_dir / "sft-info.json"
    if sft_info_path.exists() and (task_dir / "sft" / "config.json").exists():
        # A starting policy (and reward model) from an earlier, interrupted run of the same folder.
        from transformers import AutoModelForCausalLM

        info.update(json.loads(sft_info_path.read_text()))
        sft_model = AutoModelForCausalLM.from_pretrained(str(task_dir / "sft"))
    else:
        sft_model = _train_start(task_name, task, tok, task_dir, p, info)
        info["sft_time"] = time.perf_counter() - t0
        sft_info_path.write_text(json.dumps({k: v for k, v in info.items() if k != "task"}, default=float))

    # Baselines for the win rate: the starting policy's greedy outputs on the evaluation prompts.
    for split, n in (("validation", p.val_prompts), ("test", p.test_prompts)):
        ev = _evaluator(task_name, task_dir, tok, split, n, baseline=True, p=p)
        ev.compute_baseline(sft_model)  # written to the baseline file that every arm's evaluator reads
        m = ev.metrics(ev.baseline)
        info[f"start_{split}"] = m

    # 2. Offline data: 8 samples per prompt from the starting policy at T=1, scored once.
    t1 = time.perf_counter()
    prompts = task.sample_prompts(p.offline_prompts[task_name], seed=1, split="train")
    gen = HFGenerator(sft_model, tok, max_new_tokens=_max_new_tokens(task), temperature=1.0, batch_size=256)
    rollouts = gen.generate([r["prompt"] for r in prompts], n=p.num_generations, seed=1)
    # An empty reply (EOS first) is a real sample, but the data loader refuses empty completions in a data set.
    rollouts = [r for r in rollouts if r.completion.strip()]
    reward = _training_reward(task_name, task_dir, p)
    cols = {c: [prompts[r.group][c] for r in rollouts] for c in getattr(task, "columns", ())}
    scores = reward([r.prompt for r in rollouts], [r.completion for r in rollouts], **cols)
    info["offline_gen_time"] = time.perf_counter() - t1
    info["offline_reward_mean"] = sum(scores) / len(scores)
    gcfg = config_from_dict({"model": {"name_or_path": "x"}, "data": {"train": "x", "max_prompt_length": 48,
                                                                     "max_length": 176},
                             "loss": {"objective": "grpo"}}, external_rewards=True)
    for objective in ("dpo", "kto", "grpo"):
        rows, stats = rows_from_rollouts(objective, rollouts, scores, replace(gcfg, loss=replace(gcfg.loss,
                                                                                             objective=objective)))
        if objective == "grpo":
            # Behaviour log-probs only where the loader's re-encoding of the text gives exactly the sampled ids
            # (a completion cut at max_new_tokens has no EOS); elsewhere the trainer uses the frozen starting
            # policy's, which is the same sampling policy.
            for row, r in zip(rows, rollouts):
                if encode_completion(tok, r.completion) != list(r.completion_ids):
                    row["old_logps"] = None
        _write_jsonl(task_dir / f"offline-{objective}.jsonl", rows)
        info[f"offline_{objective}_rows"] = len(rows)
    # Rejection fine-tuning control: the best-scoring sample of each prompt (if it beat the others).
    by_group: dict[int, list[tuple[float, Any]]] = {}
    for r, s in zip(rollouts, scores):
        by_group.setdefault(r.group, []).append((s, r))
    rft = []
    for _, samples in sorted(by_group.items()):
        s, r = max(samples, key=lambda sample: sample[0])  # the first of the best, in sampling order
        if s > min(score for score, _ in samples) and r.completion.strip():
            rft.append({"prompt": r.prompt, "completion": r.completion})
    _write_jsonl(task_dir / "offline-rft.jsonl", rft)
    info["offline_rft_rows"] = len(rft)
    info["prepare_time"] = time.perf_counter() - t0
    info_path.write_text(json.dumps(info, indent=2, default=float))
    return info


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    from ..feedback import save_jsonl

    save_jsonl(rows, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_arm(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one arm from the starting policy and evaluate it; returns a report run record."""
    _setup_worker()
    import torch
    from transformers import AutoModelForCausalLM

    from ..config import config_from_dict
    from ..run import train

    p = Preset(**spec["preset"])
    task_name, task_dir = spec["task"], Path(spec["dir"])
    objective, arm, seed, lr = spec["objective"], spec["arm"], spec["seed"], spec["lr"]
    task = _task(task_name, p)
    steps = p.steps[task_name]
    tok = _tokenizer(task_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(task_dir / "sft"))
    rows_per_step = p.prompts_per_step * {"dpo": 1, "kto": 2, "grpo": p.num_generations, "sft": 2}[objective]
    online = arm in ("online", "semi-online")
    hl = arm == "humanline-offline"
    data: list[dict[str, Any]] = []
    if not online:
        data = _read_jsonl(task_dir / f"offline-{'rft' if arm == 'rft' else objective}.jsonl")
        if not data:
            raise HumanlineError(f"arena: the starting policy's samples gave no {arm} rows for {objective} on "
                                 f"{task_name} (no prompt had samples of different scores); a longer SFT helps")
        rows_per_step = min(rows_per_step, len(data))  # a tiny --quick data set can be smaller than one batch
    cfg_dict: dict[str, Any] = {
        "model": {"name_or_path": str(task_dir / "sft")},
        "data": {"train": "arena", "max_prompt_length": 48, "max_length": 176},
        "loss": {"objective": objective, "beta": 0.1, "epsilon_low": 0.2, "epsilon_high": 0.2, "kl_beta": 0.0},
        "humanline": {"enabled": hl, "log_eps_P": spec.get("log_eps_P", -1.0),
                      "log_eps_R": spec.get("log_eps_R", 1.5)},
        "reference": {"sync_every": spec.get("sync_every", 1)},
        "optim": {"lr": lr, "warmup_ratio": 0.0, "scheduler": "constant", "max_grad_norm": 1.0},
        "rollout": {"generate_every": (1 if arm == "online" else p.semi_online) if online else 0,
                    "prompts_per_step": p.prompts_per_step, "num_generations": p.num_generations,
                    "temperature": 1.0, "max_new_tokens": _max_new_tokens(task), "generation_batch_size": 256,
                    "pair_rule": "best_worst", "binary_rule": "pairs"},
        "eval": {"every": max(1, steps // p.evals)},
        "train": {"max_steps": steps, "batch_size": rows_per_step, "micro_batch_size": 64, "seed": seed,
                  "output_dir": spec["out"], "progress": False, "save_final": False, "log_every": 1},
    }
    cfg = config_from_dict(cfg_dict, external_rewards=True)
    # Curves (and the sweeps' selection) on validation prompts; test prompts only for the reported number.
    curve_eval = _evaluator(task_name, task_dir, tok, "validation", p.val_prompts, baseline=True, p=p)
    prepared = json.loads((task_dir / "prepared.json").read_text())
    start_metric = _metric(task_name, prepared["start_validation"])
    if online:
        prompts = task.sample_prompts(steps * p.prompts_per_step * 2, seed=2, split="train")
        result = train(cfg, model=model, tokenizer=tok, train_dataset=prompts,
                       rewards=[_training_reward(task_name, task_dir, p)], evaluators=[curve_eval])
    else:
        result = train(cfg, model=model, tokenizer=tok, train_dataset=data, evaluators=[curve_eval])
    history = [{"step": 0, "wall": 0.0, "metric": start_metric}]
    diag: dict[str, list[float]] = {}
    for m in result.history:
        if "eval/reward" in m:
            history.append({"step": int(m["step"]), "wall": m.get("time/train", 0.0) + m.get("time/generation", 0.0),
                            "metric": _metric(task_name, m)})
        for k in ("humanline/unclamped", "clip_ratio/region_mean", "logratio/abs_mean", "rewards/margins"):
            if k in m and "loss" in m:
                diag.setdefault(k, []).append(m[k])
    # The final evaluation entry has no timing of its own: give it the run's totals.
    if len(history) > 1:
        history[-1]["wall"] = result.train_time + result.generation_time
    metric = history[-1]["metric"]  # the trainer's final evaluation
    test_metric = None
    if spec.get("test", False):
        test_eval = _evaluator(task_name, task_dir, tok, "test", p.test_prompts, baseline=True, p=p)
        test_metric = _metric(task_name, test_eval(result.model, result.step))
    return {"task": task_name, "objective": objective if arm != "rft" else "rft", "arm": arm, "seed": seed,
            "lr": lr, "params": {k: spec[k] for k in ("lr", "sync_every", "log_eps_P", "log_eps_R") if k in spec},
            "val_metric": metric, "metric": test_metric, "history": history,
            "gen_time": result.generation_time, "train_time": result.train_time,
            "diagnostics": {k: sum(v) / len(v) for k, v in diag.items()},
            "metric_name": task.metric_name if hasattr(task, "metric_name") else "metric"}


# ------------------------------------------------------------------------------------------------------------
# The driver.

class _Pool:
    """Worker processes (spawned: no torch state is forked), or in-process when ``workers == 1``.

    Several threads (one per task's pipeline) may call ``run_all`` at once: jobs from both tasks share the
    workers, so no core waits at a barrier while the other task finishes a stage.
    """

    def __init__(self, workers: int, total_jobs: int) -> None:
        from tqdm.auto import tqdm

        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else None
        self.bar = tqdm(total=total_jobs, desc="arena jobs", dynamic_ncols=True)
        self.failure: BaseException | None = None  # the first job that failed (the cause of any cancellations)

    def run_all(self, fn: Callable[[dict], dict], specs: list[dict],
                on_done: Callable[[dict, dict], None] | None = None) -> list[dict]:
        results: list[dict | None] = [None] * len(specs)
        if self.pool is None:
            for i, spec in enumerate(specs):
                results[i] = fn(spec)
                if on_done:
                    on_done(spec, results[i])
                self.bar.update(1)
            return [r for r in results if r is not None]
        # Longest jobs first, so that the last job to finish is a short one.
        order = sorted(range(len(specs)), key=lambda i: -_expected_cost(specs[i]))
        futures: dict[Future, int] = {self.pool.submit(fn, specs[i]): i for i in order}
        pending = set(futures)
        while pending:
            # With a timeout: futures cancelled by shutdown(cancel_futures=True) never wake a waiter (CPython).
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            if self.failure is not None and not done:  # a job of the other pipeline failed: stop waiting
                raise HumanlineError("arena stopped: another job failed") from self.failure
            for f in done:
                i = futures[f]
                try:
                    results[i] = f.result()
                except BaseException as e:
                    if self.failure is None and not isinstance(e, CancelledError):
                        self.failure = e
                    self.pool.shutdown(wait=False, cancel_futures=True)  # fail fast, leave no queue behind
                    raise
                if on_done:
                    on_done(specs[i], results[i])
                self.bar.update(1)
        return [r for r in results if r is not None]

    def close(self) -> None:
        self.bar.close()
        if self.pool is not None:
            self.pool.shutdown(wait=self.failure is None, cancel_futures=True)


def _expected_cost(spec: dict[str, Any]) -> float:
    """Rough relative cost of a job (measured: online arms generate, GRPO trains on 8x the rows)."""
    if "arm" not in spec:
        return 1e6  # preparing a task comes first
    steps = Preset(**spec["preset"]).steps[spec["task"]]
    cost = {"dpo": 1.0, "kto": 1.4, "grpo": 2.6, "sft": 0.7}[spec["objective"]]
    if spec["arm"] in ("online", "semi-online"):
        cost += 3.0
    return steps * cost * (2.0 if spec["task"] == "describe" else 1.0)


def _arm_label(r: dict[str, Any]) -> str:
    extra = "".join(f" {k}={v}" for k, v in r["params"].items())
    return f"{r['task']:9s} {r['objective']:4s} {r['arm']:18s} seed {r['seed']}{extra}"


def _arms(p: Preset) -> list[tuple[str, str]]:
    arms = [(o, a) for o in OBJECTIVES for a in ("offline", "online", "humanline-offline")]
    if p.semi_online:
        arms += [(o, "semi-online") for o in OBJECTIVES]
    return arms + [("sft", "rft")]


def _job_count(p: Preset) -> int:
    """Jobs per task: preparation, the sweeps (or nothing), and the seeds the sweeps did not cover."""
    arms = len(_arms(p))
    if not p.sweep:
        return 1 + arms * p.seeds
    lrs = sum(len(p.lr_grid["rft" if a == "rft" else o]) for o, a in _arms(p))
    return 1 + lrs + len(OBJECTIVES) * (len(p.humanline_grid) - 1) + arms * (p.seeds - 1)


def _task_pipeline(task: str, pool: _Pool, p: Preset, out: Path) -> tuple[dict, list[dict], list[dict]]:
    """One task from start to finish: prepare, sweep on seed 0 (validation prompts), then every seed at the
    chosen settings (test prompts). Returns (preparation info, run records, sweep records)."""
    preset_dict = asdict(p)
    info = pool.run_all(prepare_task, [{"task": task, "dir": str(out / task), "preset": preset_dict}])[0]
    tqdm_write(f"  {task}: SFT {info['sft_steps']} steps; start {json.dumps(_round(info['start_test']))}; "
               f"offline reward mean {info['offline_reward_mean']:.3f}")

    def spec(objective: str, arm: str, seed: int, lr: float, **extra: Any) -> dict[str, Any]:
        name = f"{objective}-{arm}-s{seed}-lr{lr:g}" + "".join(f"-{k}{v}" for k, v in extra.items())
        return {"task": task, "dir": str(out / task), "preset": preset_dict, "objective": objective, "arm": arm,
                "seed": seed, "lr": lr, "test": True, "out": str(out / task / "runs" / name), **extra}

    def log(kind: str) -> Callable[[dict, dict], None]:
        key = "metric" if kind == "test" else "val_metric"
        return lambda s, r: tqdm_write(f"  {_arm_label(r)}: {kind} {r[key]:.3f}")

    arms = _arms(p)
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    sweeps: list[dict[str, Any]] = []
    swept: list[dict[str, Any]] = []  # seed-0 runs of the sweeps (also evaluated on the test prompts)
    if p.sweep:
        # learning rates per arm, on seed 0 and the validation prompts
        first = [spec(o, a, 0, lr) for o, a in arms for lr in p.lr_grid["rft" if a == "rft" else o]]
        done = pool.run_all(run_arm, first, on_done=log("val"))
        for o, a in arms:
            obj = "rft" if a == "rft" else o
            best = max((r for r in done if r["objective"] == obj and r["arm"] == a), key=lambda r: r["val_metric"])
            chosen[(o, a)] = dict(best["params"])
        # humanline's sync_every and bounds, at its best learning rate
        second = [spec(o, "humanline-offline", 0, chosen[(o, "humanline-offline")]["lr"], sync_every=k, log_eps_P=lo,
                       log_eps_R=hi) for o in OBJECTIVES for k, lo, hi in p.humanline_grid[1:]]
        done2 = pool.run_all(run_arm, second, on_done=log("val"))
        for o in OBJECTIVES:
            lr = chosen[(o, "humanline-offline")]["lr"]
            cands = [r for r in done + done2 if r["objective"] == o and r["arm"] == "humanline-offline"
                     and r["params"]["lr"] == lr]
            chosen[(o, "humanline-offline")] = dict(max(cands, key=lambda r: r["val_metric"])["params"])
        swept = done + done2
        sweeps = [_sweep_record(r) for r in swept]
        for s in sweeps:
            s["selected"] = _same_params(s["params"], chosen[(s["objective"] if s["objective"] != "rft" else "sft",
                                                              s["arm"])])
    else:
        chosen = {(o, a): {"lr": DEFAULT_LR["rft" if a == "rft" else o]} for o, a in arms}

    # The reported runs: every seed at the chosen settings, evaluated on the test prompts (seed 0 is the
    # selected sweep run: selection looked only at validation prompts).
    runs: list[dict[str, Any]] = []
    final_specs = []
    for o, a in arms:
        params = chosen[(o, a)]
        obj = "rft" if a == "rft" else o
        reuse = [r for r in swept if (r["objective"], r["arm"]) == (obj, a) and _same_params(r["params"], params)]
        runs += reuse[:1]
        extra = {k: v for k, v in params.items() if k != "lr"}
        final_specs += [spec(o, a, seed, params["lr"], **extra) for seed in range(1 if reuse else 0, p.seeds)]
    runs += pool.run_all(run_arm, final_specs, on_done=log("test"))
    return info, runs, sweeps


def run_arena(output: str = "arena-run", *, preset: str = "default", seeds: int | None = None,
              workers: int | None = None) -> dict[str, Any]:
    """Run the arena and write ``results.json``, ``results.md`` and the PNG plots into ``output``."""
    from concurrent.futures import ThreadPoolExecutor

    from .report import summary_text, write_report

    if preset not in PRESETS:
        raise HumanlineError(f"unknown arena preset {preset!r} (choose from {', '.join(PRESETS)})")
    p = PRESETS[preset]
    if seeds is not None:
        if seeds < 1:
            raise HumanlineError("--seeds must be >= 1")
        p = replace(p, seeds=seeds)
    workers = workers or os.cpu_count() or 1
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"humanline arena ({preset}): {len(p.tasks)} tasks, objectives {', '.join(OBJECTIVES)}, "
          f"{p.seeds} seed(s), steps per arm {_steps_text(p)}, {workers} worker(s); output in {out}/")
    pool = _Pool(workers, _job_count(p) * len(p.tasks))
    try:
        if pool.pool is None:
            per_task = [_task_pipeline(t, pool, p, out) for t in p.tasks]
        else:
            with ThreadPoolExecutor(len(p.tasks)) as threads:
                futures = [threads.submit(_task_pipeline, t, pool, p, out) for t in p.tasks]
            # A failed job shuts the pool down, so the other pipeline fails too (cancelled jobs, or no new ones
            # accepted): raise the job failure that caused it.
            errors = [f.exception() for f in futures if f.exception() is not None]
            if errors:
                raise pool.failure or errors[0]
            per_task = [f.result() for f in futures]
    finally:
        pool.close()
    prepared = [info for info, _, _ in per_task]
    runs = [r for _, task_runs, _ in per_task for r in task_runs]
    sweeps = [s for _, _, task_sweeps in per_task for s in task_sweeps]
    # Starting-policy rows, so the table shows where every arm began.
    for info in prepared:
        runs.append({"task": info["task"], "objective": "sft", "arm": "start", "seed": 0,
                     "metric": _metric(info["task"], info["start_test"]),
                     "val_metric": _metric(info["task"], info["start_validation"]), "history": [], "gen_time": 0.0,
                     "train_time": info["sft_time"], "lr": 1e-3, "diagnostics": {}})
    wall = time.perf_counter() - started
    meta = {"preset": preset, "preset_values": asdict(p), "wall_clock_s": wall, "workers": workers,
            "prepared": prepared, "torch_threads_per_worker": 1}
    paths = write_report({"runs": runs, "sweeps": sweeps, "meta": meta}, out)
    print()
    print(summary_text({"runs": runs, "sweeps": sweeps, "meta": meta}))
    print(f"\narena finished in {wall / 60:.1f} min; report: {paths['md']}")
    return {"runs": runs, "sweeps": sweeps, "meta": meta, "paths": {k: str(v) for k, v in paths.items()}}


def tqdm_write(text: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(text)


def _sweep_record(r: dict[str, Any]) -> dict[str, Any]:
    return {"task": r["task"], "objective": r["objective"], "arm": r["arm"], "seed": r["seed"],
            "metric": r["val_metric"], "params": r["params"], "selected": False}


def _same_params(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(math.isclose(float(a.get(k, 0)), float(b.get(k, 0))) for k in set(a) | set(b))


def _steps_text(p: Preset) -> str:
    return ", ".join(f"{t} {p.steps[t]}" for t in p.tasks)


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in d.items()}
