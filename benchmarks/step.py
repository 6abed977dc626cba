"""Training-step throughput and peak memory: humanline's trainer vs TRL 1.16 vs a plain-PyTorch floor.

    python benchmarks/step.py                          # 5M model, batch 16, sequence length 128, all objectives
    python benchmarks/step.py --size tiny --steps 20 --objectives dpo,grpo
    python benchmarks/step.py --no-memory --no-vocab   # throughput only

For each objective (DPO, KTO, GRPO) and variant (normal, humanline), one offline optimizer step of:

(a) humanline  ``Trainer.train_step`` on prepared (tokenised) examples: collation, forwards, loss, backward,
               clipping, the reference sync (humanline), the optimizer step;
(b) trl        TRL 1.16's DPOTrainer / KTOTrainer / GRPOTrainer, driven step by step as its training loop does:
               its collator on the same tokenised rows, ``training_step`` (forward, loss, backward), gradient
               clipping, optimizer and scheduler step, ``zero_grad`` and, in the humanline variant, its
               ``SyncRefModelCallback`` (alpha 1, every step). GRPO: a GRPOTrainer whose generation returns the
               fixed completions of the batch (``_generate_single_turn`` overridden); the rest of its
               ``_generate_and_score_completions`` (reference forward, reward, advantages) runs as usual;
(c) floor      a plain loop on the same padded batch, collated once beforehand: policy forward + backward,
               reference forward, naive loss (full ``log_softmax``), AdamW step; humanline variant: plus the
               reference copy (``torch._foreach_copy_``) and the clamp.

Same model folder, data, batch, sequence lengths, dtype (fp32; TRL's bf16 and gradient-checkpointing defaults are
turned off), learning rate, gradient clipping (humanline and TRL: max norm 1; the floor does not clip).
Reference forwards per step, the same for the three: DPO 1 (2B rows), KTO 2 (B example rows, B KL rows; plus a
no-grad policy forward of the KL rows), GRPO normal 0 (TRL beta=0), GRPO humanline 1 (TRL beta=0.04 so that it
keeps a reference).

Throughput is measured in one process, the contenders alternating step by step (a, b, c, a, b, c, ...); the
ratios are medians of per-round ratios. Peak memory is measured per contender in a fresh subprocess (RSS high-water
mark on CPU, ``torch.cuda.max_memory_allocated`` on GPU).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import Data, Series  # noqa: E402

LR = 1e-6
BETA = 0.1
GRPO_KL_BETA = 0.04  # TRL GRPO keeps a reference model only when beta != 0
HL_BOUNDS = (-1.0, 1.5)  # humanline's default clamp (config.humanline.log_eps_P / log_eps_R)
CONTENDERS = ("humanline", "trl", "floor")


# ======================================================================================= contenders

class Humanline:
    """(a) ``Trainer.train_step`` on prepared examples, one micro-batch per step."""

    name = "humanline"

    def __init__(self, objective: str, variant: str, path: str, data: Data, seq_len: int) -> None:
        from humanline.config import load_config
        from humanline.run import prepare_offline
        from humanline.trainer import DatasetSource, Trainer

        tok = common.load_tokenizer(path)
        model = common.load_model(path)
        b = data.per_step
        base = {"model": {"name_or_path": path},
                "data": {"train": "rows", "max_length": seq_len, "max_prompt_length": seq_len // 2},
                "loss": {"objective": objective, "beta": BETA},
                "humanline": {"enabled": variant == "humanline",
                              "log_eps_P": HL_BOUNDS[0], "log_eps_R": HL_BOUNDS[1]},
                "optim": {"lr": LR, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
                "train": {"max_steps": 10**9, "batch_size": b, "micro_batch_size": b,
                          "output_dir": tempfile.mkdtemp(prefix="hl-bench-"), "progress": False,
                          "save_final": False}}
        cfg = load_config(None, [], base=base)
        examples, _, _ = prepare_offline(cfg, tok, data.rows)
        assert len(examples) == len(data.rows)
        self.examples = examples
        self.batches = [examples[i * b:(i + 1) * b] for i in range(data.steps)]
        self.trainer = Trainer(cfg, model, tok, DatasetSource(examples, b, 0))
        self.sync_times: list[float] = []
        ref = self.trainer.reference
        if ref is not None and ref.mode != "frozen":
            original = ref.maybe_sync

            def timed_sync(policy: torch.nn.Module, step: int) -> bool:
                t, out = common.timed(lambda: original(policy, step))
                self.sync_times.append(t)
                return out

            ref.maybe_sync = timed_sync  # type: ignore[method-assign]

    def tokens(self, i: int) -> int:
        from humanline.data import collate

        batch = collate(self.batches[i % len(self.batches)], self.trainer.settings.objective,
                        pad_token_id=self.trainer.pad_id)
        am = batch["attention_mask"]
        return int(am[: am.shape[0] // 2].sum()) if self.trainer.settings.objective == "kto" else int(am.sum())

    def step(self, i: int) -> None:
        self.trainer.train_step(self.batches[i % len(self.batches)])
        self.trainer.step += 1


class TRL:
    """(b) TRL 1.16, one optimizer step as its ``Trainer._inner_training_loop`` does it."""

    name = "trl"

    def __init__(self, objective: str, variant: str, path: str, data: Data, seq_len: int) -> None:
        from datasets import Dataset

        self.objective = objective
        tok = common.load_tokenizer(path)
        hl = variant == "humanline"
        b = data.per_step
        common_args = dict(
            output_dir=tempfile.mkdtemp(prefix="trl-bench-"), per_device_train_batch_size=b,
            gradient_accumulation_steps=1, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            max_grad_norm=1.0, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
            logging_steps=10**9, save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
            seed=0, dataloader_num_workers=0,
        )
        if objective == "dpo":
            from trl import DPOConfig, DPOTrainer

            args = DPOConfig(**common_args, beta=BETA, max_length=seq_len, sync_ref_model=hl,
                             ref_model_mixup_alpha=1.0, ref_model_sync_steps=1)
            self.trainer = DPOTrainer(model=path, args=args, train_dataset=Dataset.from_list(data.rows),
                                      processing_class=tok)
            keys = ("prompt_ids", "chosen_ids", "rejected_ids")
        elif objective == "kto":
            from trl import KTOConfig, KTOTrainer

            args = KTOConfig(**common_args, beta=BETA, max_length=seq_len, sync_ref_model=hl,
                             ref_model_mixup_alpha=1.0, ref_model_sync_steps=1, train_sampling_strategy="sequential")
            self.trainer = KTOTrainer(model=path, args=args, train_dataset=Dataset.from_list(data.rows),
                                      processing_class=tok)
            keys = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
        elif objective == "grpo":
            from trl import GRPOConfig

            enc = tok([r["completion"] for r in data.rows], add_special_tokens=False)["input_ids"]
            rows = [{"prompt": r["prompt"], "fixed_completion_ids": ids + [tok.eos_token_id], "score": r["score"]}
                    for r, ids in zip(data.rows, enc)]
            args = GRPOConfig(**common_args, num_generations=data.group, max_completion_length=seq_len,
                              beta=GRPO_KL_BETA if hl else 0.0, sync_ref_model=hl, ref_model_mixup_alpha=1.0,
                              ref_model_sync_steps=1, loss_type="dapo", temperature=1.0)
            self.trainer = _fixed_completion_grpo()(model=path, reward_funcs=[_score_reward], args=args,
                                                    train_dataset=Dataset.from_list(rows), processing_class=tok)
            keys = None
        else:
            raise ValueError(objective)
        t = self.trainer
        if keys is None:  # GRPO takes the raw rows: prompts are tokenised inside its step
            self.features = [t.train_dataset[i] for i in range(len(t.train_dataset))]
        else:
            ds = t.train_dataset
            self.features = [{k: ds[i][k] for k in keys} for i in range(len(ds))]
        self.b, self.steps = b, data.steps
        t.create_optimizer_and_scheduler(num_training_steps=10**9)
        t.model_wrapped, t.optimizer = t.accelerator.prepare(t.model, t.optimizer)
        t.model = t.model_wrapped
        self.sync_times: list[float] = []
        t._tr_loss = torch.zeros((), device=common.device())
        from trl.trainer.callbacks import SyncRefModelCallback

        for cb in t.callback_handler.callbacks:
            if isinstance(cb, SyncRefModelCallback):
                def timed_sync(model, target, alpha, _orig=SyncRefModelCallback.sync_target_model):
                    dt, _ = common.timed(lambda: _orig(model, target, alpha))
                    self.sync_times.append(dt)

                cb.sync_target_model = timed_sync  # instance attribute shadows the staticmethod
        if hl and not self.sync_hooked(t):
            raise RuntimeError("TRL did not register its SyncRefModelCallback")

    @staticmethod
    def sync_hooked(t: Any) -> bool:
        from trl.trainer.callbacks import SyncRefModelCallback

        return any(isinstance(cb, SyncRefModelCallback) for cb in t.callback_handler.callbacks)

    def _features(self, i: int) -> list[dict[str, Any]]:
        i %= self.steps
        return self.features[i * self.b:(i + 1) * self.b]

    def tokens(self, i: int) -> int:
        feats = self._features(i)
        if self.objective == "grpo":
            ids = self.trainer.processing_class([f["prompt"] for f in feats])["input_ids"]
            return sum(len(p) + len(f["fixed_completion_ids"]) for p, f in zip(ids, feats))
        return int(self.trainer.data_collator(feats)["attention_mask"].sum())

    def step(self, i: int) -> None:
        """What ``transformers.Trainer._run_epoch`` does for one optimizer step with one micro-batch, less the
        dataloader (the collator is called here, on the same rows) and the logging check."""
        t = self.trainer
        model = t.model_wrapped
        feats = self._features(i)
        batch = feats if self.objective == "grpo" else t.data_collator(feats)
        common.trl_optimizer_step(t, model, batch)  # its step-end callbacks run SyncRefModelCallback


def _score_reward(prompts: list, completions: list, score: list[float], **_: Any) -> list[float]:
    """GRPO reward for the fixed completions: the data set's score column (deterministic)."""
    return [float(s) for s in score]


def _fixed_completion_grpo() -> type:
    from trl import GRPOTrainer

    class FixedCompletionGRPOTrainer(GRPOTrainer):
        """GRPOTrainer whose generation returns the batch's stored completions (offline GRPO in TRL)."""

        def _generate_and_score_completions(self, inputs):  # type: ignore[override]
            self._fixed = [list(x["fixed_completion_ids"]) for x in inputs]
            return super()._generate_and_score_completions(inputs)

        def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations,
                                  has_tool_images=False):  # type: ignore[override]
            assert len(prompt_ids) == len(self._fixed)
            return self._fixed, None

    return FixedCompletionGRPOTrainer


class Floor:
    """(c) The unavoidable work on the same padded batch: forwards, naive loss, backward, AdamW step."""

    name = "floor"

    def __init__(self, objective: str, variant: str, path: str, data: Data, seq_len: int,
                 examples: list[dict[str, Any]]) -> None:
        from humanline.data import collate

        self.objective, self.hl = objective, variant == "humanline"
        tok = common.load_tokenizer(path)
        self.model = common.load_model(path)
        self.model.train()
        self.needs_ref = objective in ("dpo", "kto") or self.hl
        self.ref = None
        if self.needs_ref:
            self.ref = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR)
        self.params = list(self.model.parameters())
        self.ref_params = list(self.ref.parameters()) if self.ref is not None else []
        dev = common.device()
        b = data.per_step
        self.batches = []
        for i in range(data.steps):
            batch = collate(examples[i * b:(i + 1) * b], objective, pad_token_id=tok.pad_token_id)
            batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            if objective == "kto":  # two slices, each trimmed to its own longest row
                batch["main"] = _trim(batch, slice(0, b))
                batch["kl"] = _trim(batch, slice(b, None))
            self.batches.append(batch)

    def tokens(self, i: int) -> int:
        am = self.batches[i % len(self.batches)]["attention_mask"]
        return int(am[: am.shape[0] // 2].sum()) if self.objective == "kto" else int(am.sum())

    def _logps(self, model: torch.nn.Module, ids: torch.Tensor, am: torch.Tensor, labels: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits[:, :-1]
        target = labels[:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask

    def _ratio(self, pol: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lr = pol - ref
        return lr.clamp(*HL_BOUNDS) * mask if self.hl else lr

    def step(self, i: int) -> None:
        batch = self.batches[i % len(self.batches)]
        if self.objective == "dpo":
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            pol, mask = self._logps(self.model, *args)
            with torch.no_grad():
                ref, _ = self._logps(self.ref, *args)
            s = self._ratio(pol, ref, mask).sum(-1)
            c, r = s.chunk(2)
            loss = -F.logsigmoid(BETA * (c - r)).mean()
        elif self.objective == "kto":
            with torch.no_grad():
                kp, kmask = self._logps(self.model, *batch["kl"])
                kr, _ = self._logps(self.ref, *batch["kl"])
                z0 = self._ratio(kp, kr, kmask).sum(-1).mean().clamp(min=0)
            pol, mask = self._logps(self.model, *batch["main"])
            with torch.no_grad():
                ref, _ = self._logps(self.ref, *batch["main"])
            r = self._ratio(pol, ref, mask).sum(-1)
            loss = torch.where(batch["label"], 1 - torch.sigmoid(BETA * (r - z0)),
                               1 - torch.sigmoid(BETA * (z0 - r))).mean()
        else:
            args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
            pol, mask = self._logps(self.model, *args)
            if self.hl:
                with torch.no_grad():
                    ref, _ = self._logps(self.ref, *args)
                log_rho = self._ratio(pol, ref, mask)
            else:
                log_rho = pol - pol.detach()
            rho = torch.exp(log_rho)
            adv = batch["advantages"].unsqueeze(1)
            per = -torch.minimum(adv * rho, adv * rho.clamp(0.8, 1.2))
            loss = (per * mask).sum() / mask.sum()
        loss.backward()
        if self.hl:
            with torch.no_grad():
                torch._foreach_copy_(self.ref_params, self.params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _trim(batch: dict[str, Any], rows: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, am, labels = batch["input_ids"][rows], batch["attention_mask"][rows], batch["labels"][rows]
    width = int(am.sum(1).max())
    return ids[:, :width].contiguous(), am[:, :width].contiguous(), labels[:, :width].contiguous()


def build(name: str, objective: str, variant: str, path: str, data: Data, seq_len: int,
          examples: list[dict[str, Any]] | None = None) -> Any:
    if name == "humanline":
        return Humanline(objective, variant, path, data, seq_len)
    if name == "trl":
        return TRL(objective, variant, path, data, seq_len)
    if name == "floor":
        if examples is None:
            examples = Humanline(objective, variant, path, data, seq_len).examples
        return Floor(objective, variant, path, data, seq_len, examples)
    raise ValueError(name)


# ====================================================================================== throughput

def run_throughput(objective: str, args: argparse.Namespace, path: str) -> dict[str, Any]:
    """All (contender, variant) pairs of one objective, alternating step by step in this process."""
    data = common.make_data(objective, args.batch, args.seq_len, args.batches, group=args.group,
                            fixed=args.fixed_length, seed=args.seed)
    order: list[tuple[str, str]] = [(c, v) for v in args.variants for c in args.contenders]
    built: dict[tuple[str, str], Any] = {}
    for c, v in order:
        examples = built[("humanline", v)].examples if c == "floor" and ("humanline", v) in built else None
        built[(c, v)] = build(c, objective, v, path, data, args.seq_len, examples)
    # the same tokens for everyone, and as counted from the data
    for i in range(data.steps):
        expected = common.count_tokens(data.batch(i), objective)
        for key, obj in built.items():
            got = obj.tokens(i)
            if got != expected:
                raise RuntimeError(f"{objective} {key}: batch {i} has {got} tokens, expected {expected}")
    tokens = [common.count_tokens(data.batch(i), objective) for i in range(data.steps)]
    series = {key: Series() for key in order}
    per_token = {key: [] for key in order}  # seconds per token, per round (for paired ratios)
    load = []
    for r in range(args.warmup + args.steps):
        for key in order:
            dt, _ = common.timed(lambda k=key, r=r: built[k].step(r))
            if r >= args.warmup:
                series[key].add(dt)
                per_token[key].append(dt / tokens[r % data.steps])
        if r >= args.warmup:
            load.append(common.load_average()[0])
    out: dict[str, Any] = {"objective": objective, "tokens_per_step_mean": sum(tokens) / len(tokens),
                           "load_1min": [min(load), max(load)], "contenders": {}}
    for key in order:
        c, v = key
        s = series[key].summary()
        s["tokens_per_s"] = common.statistics.median([1 / x for x in per_token[key]])  # median over rounds
        sync = getattr(built[key], "sync_times", [])
        if sync:
            sync = sync[args.warmup:] or sync
            s["sync_ms_median"] = 1e3 * common.statistics.median(sync)
        out["contenders"][f"{c}/{v}"] = s
    out["ratios"] = {}
    for v in args.variants:
        hl = per_token.get(("humanline", v))
        if hl is None:
            continue
        if ("trl", v) in per_token:
            out["ratios"][f"{v}: humanline/trl throughput"] = common.paired_ratio(per_token[("trl", v)], hl)
        if ("floor", v) in per_token:
            out["ratios"][f"{v}: humanline/floor time"] = common.paired_ratio(hl, per_token[("floor", v)])
    if ("humanline", "normal") in per_token and ("humanline", "humanline") in per_token:
        out["ratios"]["humanline trainer: humanline/normal time"] = common.paired_ratio(
            per_token[("humanline", "humanline")], per_token[("humanline", "normal")])
        if ("floor", "normal") in per_token and ("floor", "humanline") in per_token:
            out["ratios"]["floor: humanline/normal time"] = common.paired_ratio(
                per_token[("floor", "humanline")], per_token[("floor", "normal")])
    if args.profile:
        out["profile"] = profile(built, order, args)
    built.clear()
    gc.collect()
    return out


def profile(built: dict[tuple[str, str], Any], order: list[tuple[str, str]], args: argparse.Namespace) -> dict:
    """torch.profiler: the top operators (self CPU time) of 3 steps of each contender, printed."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    tables = {}
    for key in order:
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with tprofile(activities=acts) as prof:
            for r in range(3):
                built[key].step(r)
        tables["/".join(key)] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
        print(f"\n--- profile {key} (3 steps) ---\n{tables['/'.join(key)]}", flush=True)
    return tables


# ========================================================================================== memory

def child_memory(args: argparse.Namespace) -> None:
    """In a fresh process: one contender's peak memory over warm-up + measured steps."""
    common.set_threads(args.threads)
    common.quiet()
    path = common.model_dir(args.size, args.model_root)
    data = common.make_data(args.objective, args.batch, args.seq_len, args.batches, group=args.group,
                            fixed=args.fixed_length, seed=args.seed)
    base = common.rss_mb()
    obj = build(args.contender, args.objective, args.variant, path, data, args.seq_len)
    obj.step(0)  # warm-up: lazily allocated state (AdamW moments) exists from here on
    gc.collect()
    common.sync()
    steady = common.rss_mb()
    setup_peak = common.peak_rss_mb()
    reset = common.reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated() / 2**20
    for r in range(1, 1 + args.memory_steps):
        obj.step(r)
    common.sync()
    step_peak = common.peak_rss_mb()
    out = {"contender": args.contender, "objective": args.objective, "variant": args.variant,
           "rss_before_mb": base, "rss_steady_mb": steady,
           "peak_rss_mb": max(setup_peak, step_peak),  # the whole process (imports, loading, steps)
           "step_peak_above_steady_mb": step_peak - steady if reset else float("nan")}
    if torch.cuda.is_available():
        out["cuda_resident_mb"] = resident
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out), flush=True)


def run_memory(objective: str, args: argparse.Namespace) -> dict[str, Any]:
    res = {}
    for v in args.variants:
        for c in args.contenders:
            cmd = [os.path.abspath(__file__), "--child-memory", "--contender", c, "--objective", objective,
                   "--variant", v, *_shared_flags(args)]
            res[f"{c}/{v}"] = common.run_child(cmd, env_extra=None if args.malloc_default else common.MALLOC_ENV)
    return res


def _shared_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--size", args.size, "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--group",
             str(args.group), "--batches", str(args.batches), "--threads", str(args.threads), "--seed",
             str(args.seed), "--memory-steps", str(args.memory_steps)]
    if args.model_root:
        flags += ["--model-root", args.model_root]
    if args.fixed_length:
        flags.append("--fixed-length")
    return flags


# ====================================================================== log-prob memory vs vocabulary

def child_logprobs(args: argparse.Namespace) -> None:
    """Forward + backward of the log-prob step on random [B, T, V] fp32 logits; extra peak memory above the
    logits themselves (the gradient of the logits, [B, T, V], is unavoidable and counted in both)."""
    from humanline.logprobs import token_logprobs

    common.set_threads(args.threads)
    dev = common.device()
    b, t, v = args.lp_rows, args.lp_tokens, args.vocab
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(b, t, v, generator=g).to(dev).requires_grad_(True)
    labels = torch.randint(0, v, (b, t), generator=g).to(dev)
    labels[:, : t // 4] = -100
    common.sync()
    base = common.rss_mb()
    common.reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated() / 2**20

    def step() -> None:
        if args.impl == "ours":
            out = token_logprobs(logits, labels)
        else:
            mask = labels != -100
            out = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
            out = out.squeeze(-1) * mask
        out.sum().backward()

    seconds, _ = common.timed(step)
    logits.grad = None
    res = {"impl": args.impl, "vocab": v, "rows": b, "tokens": t, "seconds": seconds,
           "logits_mb": b * t * v * 4 / 2**20, "extra_peak_mb": common.peak_rss_mb() - base}
    if torch.cuda.is_available():
        res["extra_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 - base_cuda
    print(json.dumps(res), flush=True)


def run_vocab(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for v in args.vocab_sizes:
        for impl in ("ours", "naive"):
            cmd = [os.path.abspath(__file__), "--child-logprobs", "--impl", impl, "--vocab", str(v),
                   "--lp-rows", str(args.lp_rows), "--lp-tokens", str(args.lp_tokens), "--threads", str(args.threads)]
            out.append(common.run_child(cmd, env_extra=None if args.malloc_default else common.MALLOC_ENV))
    return out


# ========================================================================================== report

def report(env: dict[str, Any], args: argparse.Namespace, results: list[dict[str, Any]],
           memory: dict[str, dict[str, Any]], vocab: list[dict[str, Any]]) -> str:
    lines = [f"## step.py  size={args.size} ({env['params'] / 1e6:.2f}M params) batch={args.batch} "
             f"seq_len<={args.seq_len} ({'fixed' if args.fixed_length else 'variable'} lengths) "
             f"steps={args.steps} (+{args.warmup} warm-up) threads={args.threads}",
             f"machine: {env['cpu']} x{env['cores']}, {env['device']}; python {env['python']}, torch {env['torch']}, "
             f"transformers {env['transformers']}, accelerate {env['accelerate']}, trl {env['trl']}",
             f"load average at start {env['load_average']}", ""]
    if env["load_average"][0] + args.threads > (env["cores"] or 1) + 0.5:
        lines[-1:-1] = [f"WARNING: the machine is busy (load {env['load_average'][0]:.1f} on {env['cores']} cores): "
                        f"{args.threads} thread(s) per step may wait on each other; times are noisy "
                        "(the alternating rounds and paired ratios are there for that)"]
    rows = []
    for res in results:
        for key, s in res["contenders"].items():
            mem = memory.get(res["objective"], {}).get(key, {})
            peak = mem.get("cuda_peak_mb", mem.get("peak_rss_mb"))
            above = mem.get("cuda_resident_mb", mem.get("step_peak_above_steady_mb"))
            rows.append([res["objective"], key, f"{res['tokens_per_step_mean']:.0f}",
                         f"{1e3 * s['median_s']:.0f}", f"{1e3 * s['q1_s']:.0f}-{1e3 * s['q3_s']:.0f}",
                         f"{1e3 * s['min_s']:.0f}-{1e3 * s['max_s']:.0f}", f"{s['tokens_per_s']:.0f}",
                         f"{s['sync_ms_median']:.1f}" if "sync_ms_median" in s else "",
                         f"{peak:.0f}" if peak is not None else "", f"{above:.0f}" if above is not None else ""])
    mem_label = "peak GPU MiB" if torch.cuda.is_available() else "peak RSS MiB"
    lines.append(common.fmt_table(
        ["objective", "contender/variant", "tokens/step", "ms/step (median)", "IQR ms", "min-max ms", "tokens/s",
         "sync ms", mem_label, "step peak above steady MiB" if not torch.cuda.is_available() else "resident MiB"],
        rows))
    lines.append("")
    rrows = []
    for res in results:
        for name, (m, q1, q3) in res["ratios"].items():
            rrows.append([res["objective"], name, f"{m:.3f}", f"{q1:.3f}-{q3:.3f}"])
        rrows.append([res["objective"], "load average (1 min) during the rounds",
                      f"{res['load_1min'][0]:.2f}-{res['load_1min'][1]:.2f}", ""])
    lines.append(common.fmt_table(["objective", "ratio (per-round, paired)", "median", "IQR"], rrows))
    if memory:
        lines.append("")
        lines.append("peak memory, each contender in a fresh process (whole process: imports, model, reference, "
                     "optimizer state, steps)")
        mrows = []
        for obj, entries in memory.items():
            for v in args.variants:
                hl, tr = entries.get(f"humanline/{v}"), entries.get(f"trl/{v}")
                if hl and tr:
                    k = "cuda_peak_mb" if "cuda_peak_mb" in hl else "peak_rss_mb"
                    mrows.append([obj, v, f"{hl[k]:.0f}", f"{tr[k]:.0f}", f"{hl[k] / tr[k]:.3f}"])
        lines.append(common.fmt_table(["objective", "variant", "humanline peak MiB", "trl peak MiB",
                                       "humanline/trl"], mrows))
    if vocab:
        lines.append("")
        lines.append(f"log-prob step (forward + backward) on fp32 logits [{args.lp_rows}, {args.lp_tokens}, V]: extra "
                     "peak memory above the logits (a fresh process each)")
        by_v: dict[int, dict[str, dict]] = {}
        for r in vocab:
            by_v.setdefault(r["vocab"], {})[r["impl"]] = r
        vrows = []
        for v, d in sorted(by_v.items()):
            o, n = d["ours"], d["naive"]
            vrows.append([v, f"{o['logits_mb']:.0f}", f"{o['extra_peak_mb']:.0f}", f"{n['extra_peak_mb']:.0f}",
                          f"{o['extra_peak_mb'] / o['logits_mb']:.2f}", f"{n['extra_peak_mb'] / n['logits_mb']:.2f}",
                          f"{1e3 * o['seconds']:.0f}", f"{1e3 * n['seconds']:.0f}"])
        lines.append(common.fmt_table(["V", "[B,T,V] fp32 MiB", "ours extra MiB", "naive extra MiB",
                                       "ours / logits", "naive / logits", "ours ms", "naive ms"], vrows))
    return "\n".join(lines)


# ============================================================================================ main

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(common.SIZES), default="5m")
    p.add_argument("--objectives", default="dpo,kto,grpo")
    p.add_argument("--variants", default="normal,humanline")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--steps", type=int, default=10, help="measured rounds (each contender one step per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="pairs (DPO), examples (KTO), completions (GRPO)")
    p.add_argument("--group", type=int, default=8, help="GRPO completions per prompt")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--fixed-length", action="store_true", help="every sequence exactly --seq-len tokens")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-root", default=None)
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-steps", type=int, default=3)
    p.add_argument("--malloc-default", action="store_true",
                   help="memory children keep glibc's dynamic mmap threshold (noisier RSS; see common.MALLOC_ENV)")
    p.add_argument("--no-vocab", dest="vocab", action="store_false")
    p.add_argument("--vocab-sizes", default="1024,8192,32768,65536")
    p.add_argument("--lp-rows", type=int, default=8)
    p.add_argument("--lp-tokens", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables of each contender")
    p.add_argument("--profile-rows", type=int, default=15)
    p.add_argument("--json", default=None, help="also write the results here")
    # internal: one measurement in a fresh process
    p.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-logprobs", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--contender", help=argparse.SUPPRESS)
    p.add_argument("--objective", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.objectives = [o for o in args.objectives.split(",") if o]
    args.variants = [v for v in args.variants.split(",") if v]
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.vocab_sizes = [int(v) for v in args.vocab_sizes.split(",") if v]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.child_memory:
        child_memory(args)
        return 0
    if args.child_logprobs:
        child_logprobs(args)
        return 0
    common.set_threads(args.threads)
    common.quiet()
    path = common.model_dir(args.size, args.model_root)
    env = common.environment(args.threads)
    env["params"] = common.num_params(common.load_model(path))
    print(f"model {path}: {env['params'] / 1e6:.2f}M params; load average {env['load_average']}", flush=True)
    results, memory = [], {}
    for objective in args.objectives:
        t0 = time.perf_counter()
        results.append(run_throughput(objective, args, path))
        print(f"{objective}: throughput done in {time.perf_counter() - t0:.0f} s", flush=True)
        if args.memory:
            t0 = time.perf_counter()
            memory[objective] = run_memory(objective, args)
            print(f"{objective}: memory done in {time.perf_counter() - t0:.0f} s", flush=True)
    vocab = run_vocab(args) if args.vocab else []
    env["load_average_end"] = [round(x, 2) for x in common.load_average()]
    text = report(env, args, results, memory, vocab)
    print("\n" + text + f"\nload average at end {env['load_average_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "args": {k: v for k, v in vars(args).items()}, "throughput": results,
                       "memory": memory, "vocab": vocab}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
