"""One online GRPO step (generation + scoring + update), HF backend: humanline vs TRL 1.16's GRPOTrainer.

    python benchmarks/online.py                      # 5M model, 2 prompts x 8 samples, 96 new tokens
    python benchmarks/online.py --size tiny --steps 10 --variants normal

humanline: the library's online path, ``RolloutSource.examples_for_step`` (``rollout.generate_every=1``: samples
``prompts_per_step x num_generations`` completions with the HF backend, scores them, builds the GRPO rows and
writes the round file) then ``Trainer.train_step``. TRL: ``GRPOTrainer`` with ``use_vllm=False``, driven step by
step as its training loop does (``training_step``, which generates and scores, then clipping, optimizer step and
the step-end callbacks). Same model folder, prompts (all of one length, so which prompts a step draws does not
change its cost), num_generations, max_completion_length, sampling (temperature 1, no top-k / top-p), fp32, and
the same deterministic reward. Variant "humanline": humanline GRPO (synced reference, one reference forward per
step) vs TRL with beta=0.04 and ``sync_ref_model`` (alpha 1, every step); "normal": no reference in either.

Reported per contender: samples/s (median over alternating steps), the share of the step spent generating,
generated tokens per step, and the ratio humanline/TRL of samples/s (median of per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Series  # noqa: E402

LR = 1e-6
GRPO_KL_BETA = 0.04


def vowel_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """Deterministic: the fraction of vowels in the completion text."""
    out = []
    for c in completions:
        text = c if isinstance(c, str) else c[-1]["content"]
        out.append(sum(ch in "aeiou" for ch in text) / max(1, len(text)))
    return out


def make_prompts(n: int, length: int, seed: int) -> list[dict[str, str]]:
    r = random.Random(seed)
    return [{"prompt": "".join(r.choice(common.ALPHABET) for _ in range(length))} for _ in range(n)]


class Humanline:
    name = "humanline"

    def __init__(self, variant: str, path: str, prompts: list[dict], args: argparse.Namespace) -> None:
        from humanline.config import load_config
        from humanline.rollout.schedule import build_rollout_source
        from humanline.trainer import Trainer

        tok = common.load_tokenizer(path)
        model = common.load_model(path)
        n = args.prompts_per_step * args.num_generations
        base = {"model": {"name_or_path": path},
                "data": {"train": "rows", "max_length": args.prompt_length + args.max_new_tokens,
                         "max_prompt_length": args.prompt_length},
                "loss": {"objective": "grpo"}, "humanline": {"enabled": variant == "humanline"},
                "optim": {"lr": LR, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
                "rollout": {"generate_every": 1, "backend": "hf", "prompts_per_step": args.prompts_per_step,
                            "num_generations": args.num_generations, "max_new_tokens": args.max_new_tokens,
                            "temperature": 1.0, "top_p": 1.0, "generation_batch_size": n,
                            # the config must name a reward; the callable itself is passed below
                            "rewards": [{"name": "online:vowel_reward"}]},
                "train": {"max_steps": 10**9, "batch_size": n, "micro_batch_size": n,
                          "output_dir": tempfile.mkdtemp(prefix="hl-online-"), "progress": False,
                          "save_final": False}}
        cfg = load_config(None, [], base=base)
        self.source, _ = build_rollout_source(cfg, model, tok, prompts=prompts, rewards=[vowel_reward])
        self.trainer = Trainer(cfg, model, tok, self.source)
        self.gen_seconds: list[float] = []
        self.gen_tokens: list[float] = []

    def step(self, i: int) -> None:
        examples = self.source.examples_for_step(self.trainer.step)
        m = self.source.last_metrics
        self.gen_seconds.append(m.get("generation/seconds", 0.0))
        self.gen_tokens.append(sum(len(e["completion_ids"]) for e in examples))
        self.trainer.train_step(examples)
        self.trainer.step += 1


class TRL:
    name = "trl"

    def __init__(self, variant: str, path: str, prompts: list[dict], args: argparse.Namespace) -> None:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        tok = common.load_tokenizer(path)
        hl = variant == "humanline"
        n = args.prompts_per_step * args.num_generations
        cfg = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="trl-online-"), per_device_train_batch_size=n,
            gradient_accumulation_steps=1, num_generations=args.num_generations,
            max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, use_vllm=False,
            beta=GRPO_KL_BETA if hl else 0.0, sync_ref_model=hl, ref_model_mixup_alpha=1.0, ref_model_sync_steps=1,
            loss_type="dapo", learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
            bf16=False, fp16=False, gradient_checkpointing=False, report_to="none", logging_steps=10**9,
            save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True, seed=0,
        )
        self.trainer = GRPOTrainer(model=path, reward_funcs=[vowel_reward], args=cfg,
                                   train_dataset=Dataset.from_list(prompts), processing_class=tok)
        t = self.trainer
        t.create_optimizer_and_scheduler(num_training_steps=10**9)
        t.model_wrapped, t.optimizer = t.accelerator.prepare(t.model, t.optimizer)
        t.model = t.model_wrapped
        t._tr_loss = torch.zeros((), device=common.device())
        self.prompts, self.args = prompts, args
        self.gen_seconds: list[float] = []
        self.gen_tokens: list[float] = []
        original = t._generate_single_turn

        def timed_generation(*a: Any, **k: Any) -> Any:
            dt, out = common.timed(lambda: original(*a, **k))
            self.gen_seconds.append(dt)
            self.gen_tokens.append(sum(len(c) for c in out[0]))
            return out

        t._generate_single_turn = timed_generation  # type: ignore[method-assign]

    def step(self, i: int) -> None:
        t, a = self.trainer, self.args
        model = t.model_wrapped
        # what RepeatSampler yields: each prompt num_generations times in a row
        start = (i * a.prompts_per_step) % len(self.prompts)
        chosen = [self.prompts[(start + j) % len(self.prompts)] for j in range(a.prompts_per_step)]
        batch = [dict(p) for p in chosen for _ in range(a.num_generations)]
        common.trl_optimizer_step(t, model, batch)


def run(variant: str, args: argparse.Namespace, path: str) -> dict[str, Any]:
    prompts = make_prompts(args.num_prompts, args.prompt_length, args.seed)
    contenders = [cls(variant, path, prompts, args) for cls in (Humanline, TRL) if cls.name in args.contenders]
    series = {c.name: Series() for c in contenders}
    load = []
    for r in range(args.warmup + args.steps):
        for c in contenders:
            dt, _ = common.timed(lambda c=c, r=r: c.step(r))
            if r >= args.warmup:
                series[c.name].add(dt)
            else:  # drop the warm-up's generation records
                c.gen_seconds.clear()
                c.gen_tokens.clear()
        if r >= args.warmup:
            load.append(common.load_average()[0])
    n = args.prompts_per_step * args.num_generations
    out: dict[str, Any] = {"variant": variant, "samples_per_step": n, "load_1min": [min(load), max(load)],
                           "contenders": {}}
    for c in contenders:
        s = series[c.name]
        shares = [g / t for g, t in zip(c.gen_seconds, s.times)]
        out["contenders"][c.name] = {
            **s.summary(), "samples_per_s": n / s.median,
            "generation_share": common.statistics.median(shares) if shares else float("nan"),
            "generated_tokens_per_step": sum(c.gen_tokens) / max(len(c.gen_tokens), 1),
            "generation_s_median": common.statistics.median(c.gen_seconds) if c.gen_seconds else float("nan"),
        }
    if len(contenders) == 2:
        out["humanline/trl samples per s"] = common.paired_ratio(series["trl"].times, series["humanline"].times)
    return out


def report(env: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]]) -> str:
    lines = [f"## online.py  size={args.size} ({env['params'] / 1e6:.2f}M params) {args.prompts_per_step} prompts x "
             f"{args.num_generations} samples, prompt {args.prompt_length} tokens, max_new_tokens "
             f"{args.max_new_tokens}, steps={args.steps} (+{args.warmup} warm-up) threads={args.threads}",
             f"machine: {env['cpu']} x{env['cores']}, {env['device']}; torch {env['torch']}, transformers "
             f"{env['transformers']}, trl {env['trl']}; load average at start {env['load_average']}", ""]
    rows = []
    for res in results:
        for name, s in res["contenders"].items():
            rows.append([res["variant"], name, f"{s['samples_per_s']:.2f}", f"{1e3 * s['median_s']:.0f}",
                         f"{1e3 * s['q1_s']:.0f}-{1e3 * s['q3_s']:.0f}",
                         f"{1e3 * s['min_s']:.0f}-{1e3 * s['max_s']:.0f}",
                         f"{100 * s['generation_share']:.0f}%", f"{1e3 * s['generation_s_median']:.0f}",
                         f"{s['generated_tokens_per_step']:.0f}"])
    lines.append(common.fmt_table(["variant", "contender", "samples/s", "ms/step (median)", "IQR ms", "min-max ms",
                                   "generation share", "generation ms", "generated tokens/step"], rows))
    lines.append("")
    rrows = []
    for res in results:
        if "humanline/trl samples per s" in res:
            m, q1, q3 = res["humanline/trl samples per s"]
            rrows.append([res["variant"], f"{m:.3f}", f"{q1:.3f}-{q3:.3f}",
                          f"{res['load_1min'][0]:.2f}-{res['load_1min'][1]:.2f}"])
    if rrows:
        lines.append(common.fmt_table(["variant", "humanline/trl samples/s (paired median)", "IQR",
                                       "load average (1 min)"], rrows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(common.SIZES), default="5m")
    p.add_argument("--variants", default="normal,humanline")
    p.add_argument("--contenders", default="humanline,trl")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--prompt-length", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-root", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.contenders = [c for c in args.contenders.split(",") if c]
    common.set_threads(args.threads)
    common.quiet()
    path = common.model_dir(args.size, args.model_root)
    env = common.environment(args.threads)
    env["params"] = common.num_params(common.load_model(path))
    results = []
    for v in args.variants:
        t0 = time.perf_counter()
        results.append(run(v, args, path))
        print(f"{v}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    env["load_average_end"] = [round(x, 2) for x in common.load_average()]
    print("\n" + report(env, args, results) + f"\nload average at end {env['load_average_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": vars(args), "results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
