"""The one training loop, for every objective (SFT, DPO, KTO, GRPO) and every schedule.

Per optimizer step: take the step's examples (a fixed data set, or fresh / reused rollouts), give each process
its slice, cut it into micro-batches, and accumulate gradients of losses normalised by the step's *global*
counts, so the update does not depend on how the batch is split. Then clip, sync the reference (humanline:
the pre-update weights), step the optimizer. Metrics go to the progress bar, ``metrics.jsonl`` and any
accelerate trackers; checkpoints are atomic and resumable.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import zero3
from .checkpoint import capture_rng, find_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data import batches, collate
from .errors import HumanlineError
from .logprobs import sequence_logprobs
from .models import save_model
from .objectives import LossSettings, compute_loss, global_counts, kl_row_sums
from .reference import Reference
from .sharding import (
    full_optimizer_state_dict,
    full_state_dict,
    is_sharded,
    load_full_optimizer_state_dict,
    load_full_state_dict,
    local,
    make_accelerator,
    shard_like_policy,
)


class StepSource(Protocol):
    """Where each optimizer step's examples come from (a data set, or rollouts)."""

    def examples_for_step(self, step: int) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DatasetSource:
    """A fixed, tokenised data set: ``batch_size`` examples per step, reshuffled by seed every epoch."""

    def __init__(self, examples: list[dict[str, Any]], batch_size: int, seed: int) -> None:
        if len(examples) < batch_size:
            raise HumanlineError(f"the training set has {len(examples)} examples, fewer than one batch "
                                 f"(train.batch_size={batch_size})")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = len(examples) // batch_size

    def examples_for_step(self, step: int) -> list[dict[str, Any]]:
        epoch, i = divmod(step, self.per_epoch)
        order = batches(len(self.examples), self.batch_size, seed=self.seed, epoch=epoch)
        return [self.examples[j] for j in order[i]]

    def state_dict(self) -> dict[str, Any]:
        return {}  # the position is a function of the step

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@dataclass
class TrainResult:
    model: nn.Module
    run_dir: str
    step: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_time: float = 0.0
    generation_time: float = 0.0


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def make_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup_steps: int, total_steps: int
                   ) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then constant / linear decay / cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Trainer:
    """Train ``model`` with the objective, reference and schedule that ``config`` describes.

    ``source`` yields each step's tokenised examples; build it with :func:`humanline.build_source` (or let
    :func:`humanline.train` do everything from a config).
    """

    def __init__(self, config: Config, model: nn.Module, tokenizer: Any, source: StepSource, *,
                 eval_examples: list[dict[str, Any]] | None = None, accelerator: Accelerator | None = None,
                 evaluators: list[Callable[[nn.Module, int], dict[str, float]]] | None = None,
                 stop_when: Callable[[dict[str, float]], bool] | None = None) -> None:
        self.cfg, self.tokenizer, self.source = config, tokenizer, source
        self.eval_examples = eval_examples or []
        self.evaluators = evaluators or []
        self.stop_when = stop_when  # early stopping on the step's metrics (e.g. an eval accuracy target)
        # make_accelerator: FSDP also on CPU-only machines (gloo), where accelerate itself would run DDP.
        self.acc = accelerator or make_accelerator(log_with=config.train.report_to or None,
                                                   project_dir=config.train.output_dir)
        # DeepSpeed ZeRO-3 (zero3.py): the loop drives the engine itself (backward per micro-batch, the boundary on
        # the last, then gradient norm, reference sync and one engine.step()); the reference is a second engine.
        self.zero3 = self.acc.distributed_type == DistributedType.DEEPSPEED
        if self.zero3:
            if hasattr(model, "peft_config"):
                raise HumanlineError("LoRA under DeepSpeed is not supported by the humanline trainer: train LoRA "
                                     "under DDP, or fully fine-tune")
            zero3.configure(self.acc, model, micro_batch_size=config.train.micro_batch_size,
                            max_grad_norm=config.optim.max_grad_norm)
        self.run_dir = Path(config.train.output_dir)
        h = config.humanline
        self.settings = LossSettings(
            objective=config.loss.objective, beta=config.loss.beta,
            desirable_weight=config.loss.desirable_weight, undesirable_weight=config.loss.undesirable_weight,
            epsilon_low=config.loss.epsilon_low, epsilon_high=config.loss.epsilon_high,
            kl_beta=config.loss.kl_beta, loss_type=config.loss.loss_type,
            max_completion_length=config.loss.max_completion_length or config.rollout.max_new_tokens,
            humanline=config.humanline_bounds,
            reject_gamma=h.reject_gamma if h.enabled and h.clip == "reject" else None,
            seed=config.train.seed,
        )
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.reference: Reference | None = None
        # reference.precompute: the frozen reference's log-probs come with each batch (precompute.py), so no
        # reference copy of the model is built at all (config.py allows it only with a frozen reference).
        self.precomputed = config.reference.precompute and self.settings.needs_reference
        if not self.precomputed and (self.settings.needs_reference or config.reference_mode != "frozen"):
            self.reference = Reference(model, config.reference_mode, sync_every=config.reference.sync_every,
                                       ema_alpha=config.reference.ema_alpha,
                                       prepare=self._prepare_reference)
            fsdp = self.acc.distributed_type == DistributedType.FSDP
            if self.reference.peft and self.reference.mode != "frozen" and fsdp:
                raise HumanlineError("a synced reference with LoRA (a second copy of the adapter) is not supported "
                                     "under FSDP: train LoRA under DDP, or fully fine-tune")
        params = [p for p in model.parameters() if p.requires_grad]
        o = config.optim
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
        warmup = int(o.warmup_ratio * config.train.max_steps)
        self.scheduler = make_scheduler(optimizer, o.scheduler, warmup, config.train.max_steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.sharded = is_sharded(self.model)
        if self.reference is not None and self.reference.model is not None and self.sharded:
            # The sharded reference starts from exactly the shards the prepared policy starts from.
            self.reference.copy_from(self.model)
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.history: list[dict[str, float]] = []
        self.train_time = 0.0
        self.generation_time = 0.0

    def _prepare_reference(self, ref: nn.Module) -> nn.Module:
        if self.zero3:
            # Partitioned like the policy (same processes): a sync copies each process's own partitions.
            return zero3.reference_engine(self.acc, ref)
        if self.acc.distributed_type == DistributedType.FSDP:
            # Matching shards, not a full copy: each process's shard of the reference is the same slice as its
            # shard of the policy, so a sync is a local copy (reference.py).
            return shard_like_policy(self.acc, ref)
        return ref.to(self.acc.device)

    # --- helpers -------------------------------------------------------------------------------------------
    @property
    def unwrapped(self) -> nn.Module:
        return self.acc.unwrap_model(self.model)

    def _reduce_sum(self, values: Tensor) -> Tensor:
        if self.acc.num_processes == 1:
            return values
        return self.acc.reduce(values.to(self.acc.device), reduction="sum")

    def _micro_batches(self, examples: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """This process's share of the step, collated into micro-batches."""
        n, rank = self.acc.num_processes, self.acc.process_index
        mine = examples[rank::n]
        size = self.cfg.train.micro_batch_size
        out = []
        for i in range(0, len(mine), size):
            batch = collate(mine[i:i + size], self.settings.objective, pad_token_id=self.pad_id)
            # Row lengths read on the host before the copy: trimming a slice's padding then needs no device sync.
            batch["row_lengths"] = batch["attention_mask"].sum(1).tolist()
            out.append({k: v.to(self.acc.device) if isinstance(v, Tensor) else v for k, v in batch.items()})
        return out

    def _forward(self, model: nn.Module, batch: dict[str, Tensor], rows: slice | None = None
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
        ids, am, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        if rows is not None:
            ids, am, labels = ids[rows], am[rows], labels[rows]
        # Trim the padding columns that this slice does not need.
        lengths = batch.get("row_lengths")
        if lengths is not None:
            width = max(lengths if rows is None else lengths[rows])
        else:
            width = int(am.sum(1).max())
        ids, am, labels = ids[:, :width], am[:, :width], labels[:, :width]
        logps, mask = sequence_logprobs(model, ids, am, labels)
        ref = None
        if self.precomputed:
            if "ref_logps" not in batch:
                raise HumanlineError("reference.precompute is on but the batch has no precomputed reference "
                                     "log-probs: build the examples with humanline.precompute (humanline.train "
                                     "does), or set reference.precompute=false")
            ref = batch["ref_logps"] if rows is None else batch["ref_logps"][rows]
            ref = ref[:, : width - 1]
        elif self.reference is not None and self.settings.needs_reference:
            ref = self.reference.logps(self.model, ids, am, labels)
        return logps, mask, ref

    # --- one optimizer step -----------------------------------------------------------------------------------
    def train_step(self, examples: list[dict[str, Any]]) -> dict[str, float]:
        s = self.settings
        micro = self._micro_batches(examples)
        counts = global_counts(micro, s.objective)
        totals = self._reduce_sum(torch.tensor([counts["examples"], counts["tokens"]], dtype=torch.float64))
        denominators = {"examples": max(1.0, float(totals[0])), "tokens": max(1.0, float(totals[1]))}
        step_seed = s.seed * 1_000_003 + self.step
        self.model.train()

        kl_parts: list[tuple[Tensor, Tensor, Tensor]] = []
        kl_sums = None
        if s.objective == "kto":
            # z0 has no gradient and is global: one no-grad pass over every KL row of the step first.
            local = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
            for batch in micro:
                b = batch["labels"].shape[0] // 2
                with torch.no_grad():
                    logps, mask, ref = self._forward(self.model, batch, slice(b, None))
                assert ref is not None
                kl_parts.append((logps, ref, mask))
                local += kl_row_sums(s, logps, ref, mask)
            kl_sums = self._reduce_sum(local).float()

        # Under DDP the gradients are averaged over processes; the loss is already a global mean.
        scale = float(self.acc.num_processes)
        weight_total = 0.0
        # The micro-batches' losses and metrics stay tensors until the last backward: one device-to-host copy per
        # step instead of one sync per metric and micro-batch.
        parts: list[tuple[Tensor, float, dict[str, Any]]] = []
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            ctx = self.acc.no_sync(self.model) if not last and self.acc.num_processes > 1 else nullcontext()
            with ctx:
                if s.objective == "kto":
                    b = batch["labels"].shape[0] // 2
                    logps, mask, ref = self._forward(self.model, batch, slice(0, b))
                    pol_kl, ref_kl, kl_mask = kl_parts[i]
                    out = compute_loss(s, batch, logps, ref, mask, denominators, kl_sums=kl_sums,
                                       kto_kl=(pol_kl, ref_kl, kl_mask), step_seed=step_seed + i)
                else:
                    logps, mask, ref = self._forward(self.model, batch)
                    out = compute_loss(s, batch, logps, ref, mask, denominators, step_seed=step_seed + i)
                if self.zero3:
                    zero3.backward(self.model, out.loss * scale, last)
                else:
                    self.acc.backward(out.loss * scale)
            weight = float(batch["labels"].shape[0])
            weight_total += weight
            parts.append((out.loss.detach(), weight, out.metrics))
        metric_sums = _sum_metrics(parts)
        metrics = {k: (v if k == "loss" else v / max(weight_total, 1.0)) for k, v in metric_sums.items()}
        if self.acc.num_processes > 1:
            keys = sorted(metrics)
            vec = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.acc.device)
            vec = self._reduce_sum(vec)
            metrics = {k: float(v) / (1 if k == "loss" else self.acc.num_processes) for k, v in zip(keys, vec)}

        grad_norm = self._clip_and_check()
        metrics["grad_norm"] = grad_norm
        if not math.isfinite(grad_norm) or not math.isfinite(metrics["loss"]):
            if self.zero3:
                zero3.discard_gradients(self.model)
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_in_a_row += 1
            metrics["skipped"] = 1.0
            if self.nonfinite_in_a_row >= self.cfg.train.max_nonfinite:
                raise HumanlineError(f"step {self.step}: non-finite loss or gradient {self.nonfinite_in_a_row} steps "
                                     f"in a row (train.max_nonfinite); lower optim.lr or check the data")
        else:
            self.nonfinite_in_a_row = 0
            if self.reference is not None and self.reference.mode != "frozen":
                metrics["humanline/ref_lag_steps"] = float(self.reference.lag(self.step))
                self.reference.maybe_sync(self.model, self.step)
            if self.zero3:
                zero3.step(self.model)  # clips (gradient_clipping = optim.max_grad_norm) and updates
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["num_tokens"] = denominators["tokens"]
        return metrics

    def _clip_and_check(self) -> float:
        if self.zero3:
            return zero3.grad_norm(self.model)  # the norm before clipping; engine.step() clips
        max_norm = self.cfg.optim.max_grad_norm
        if max_norm is not None:
            return float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm))
        # Sharded: each process holds a shard of every gradient; the squares of the shards add up.
        squares = [local(p.grad.detach()).float().pow(2).sum() for p in self.model.parameters() if p.grad is not None]
        total = torch.stack(squares).sum() if squares else torch.zeros((), device=self.acc.device)
        if self.sharded:
            total = self._reduce_sum(total)
        return float(total.sqrt())

    # --- evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss and reward metrics on the eval split, then any generation-based evaluators."""
        out: dict[str, float] = {}
        if self.eval_examples:
            sums: dict[str, float] = {}
            n = 0.0
            size = self.cfg.eval.batch_size
            self.model.eval()
            for i in range(0, len(self.eval_examples), size):
                chunk = self.eval_examples[i:i + size]
                batch = collate(chunk, self.settings.objective, pad_token_id=self.pad_id)
                batch = {k: v.to(self.acc.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                counts = global_counts([batch], self.settings.objective)
                if self.settings.objective == "kto":
                    b = batch["labels"].shape[0] // 2
                    logps, mask, ref = self._forward(self.model, batch, slice(0, b))
                    kl = self._forward(self.model, batch, slice(b, None))
                    loss = compute_loss(self.settings, batch, logps, ref, mask, counts,
                                        kto_kl=(kl[0], kl[2], kl[1]))
                else:
                    logps, mask, ref = self._forward(self.model, batch)
                    loss = compute_loss(self.settings, batch, logps, ref, mask, counts)
                w = counts["examples"]
                n += w
                sums["loss"] = sums.get("loss", 0.0) + float(loss.loss) * w
                for k, v in loss.metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * w
            self.model.train()
            out.update({f"eval/{k}": v / max(n, 1.0) for k, v in sums.items()})
        for evaluator in self.evaluators:
            out.update(evaluator(self.unwrapped, self.step))
        return out

    # --- checkpoints -------------------------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {"step": self.step, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "last_sync_step": self.reference.last_sync_step if self.reference else 0,
                "source": self.source.state_dict(), "train_time": self.train_time,
                "generation_time": self.generation_time}

    def save(self) -> None:
        rng = self.acc.gather_for_metrics([capture_rng()], use_gather_object=True) \
            if self.acc.num_processes > 1 else [capture_rng()]
        model_state = optimizer_state = ref_state = None
        engine_dir = None
        if self.zero3:
            # DeepSpeed's partitioned states (optimizer included) go into the checkpoint's deepspeed/ folder.
            engine_dir = zero3.save_engine_state(self.model, str(self.run_dir / "checkpoints"), self.step,
                                                 is_main=self.acc.is_main_process)
        if self.sharded:
            # Gathering the full states is a collective: every process takes part, the main one writes.
            model_state = full_state_dict(self.model)
            if not self.zero3:
                optimizer_state = full_optimizer_state_dict(self.model, self.optimizer)
        if self.reference is not None and (self.sharded or self.acc.is_main_process):
            ref_state = self.reference.state_dict()  # a collective too when the reference is sharded
        if self.acc.is_main_process:
            save_checkpoint(str(self.run_dir), self.step, model=self.unwrapped, tokenizer=self.tokenizer,
                            optimizer=None if self.zero3 else self.optimizer, scheduler=self.scheduler,
                            trainer_state=self._trainer_state(), reference_state=ref_state,
                            keep_last=self.cfg.train.keep_last, rng_states=rng,
                            model_state=model_state, optimizer_state=optimizer_state,
                            move_in={zero3.ENGINE_DIR: engine_dir} if engine_dir else None)
        self.acc.wait_for_everyone()

    def save_final_model(self, path: str | os.PathLike) -> None:
        """Save the policy (a plain ``save_pretrained`` folder) to ``path``; every process must call it."""
        state = full_state_dict(self.model) if self.sharded else None
        if self.acc.is_main_process:
            save_model(self.unwrapped, self.tokenizer, str(path), merge_lora=self.cfg.lora.merge_at_end,
                       state_dict=state)
        self.acc.wait_for_everyone()

    def resume(self, resume_from: str) -> bool:
        path = find_checkpoint(str(self.run_dir), resume_from)
        if path is None:
            return False
        hooks: dict[str, Any] = {}
        if self.zero3:
            # Weights and optimizer state come from DeepSpeed's own files (deepspeed/ in the checkpoint).
            zero3.load_engine_state(self.model, path)
            hooks = {"load_model_state": lambda sd: None}
        elif self.sharded:
            # Every process reads the full states; each keeps its shards.
            hooks = {"load_model_state": lambda sd: load_full_state_dict(self.model, sd),
                     "load_optimizer_state": lambda sd: load_full_optimizer_state_dict(self.model, self.optimizer,
                                                                                       sd)}
        state, ref_state = load_checkpoint(path, model=self.unwrapped,
                                           optimizer=None if self.zero3 else self.optimizer,
                                           scheduler=self.scheduler, process_index=self.acc.process_index,
                                           **hooks)
        self.step = int(state["step"])
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.train_time = float(state.get("train_time", 0.0))
        self.generation_time = float(state.get("generation_time", 0.0))
        self.source.load_state_dict(state.get("source", {}))
        if self.reference is not None:
            self.reference.load_state_dict(ref_state, int(state.get("last_sync_step", 0)))
        self._log_line({"event": "resumed", "step": self.step, "checkpoint": path})
        return True

    # --- logging -----------------------------------------------------------------------------------------------
    def _log_line(self, record: dict[str, Any]) -> None:
        if not self.acc.is_main_process:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _write_config(self) -> None:
        if self.acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(self.run_dir / "config.yaml",
                               yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    # --- the loop ------------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg.train
        self._write_config()
        set_seed(cfg.seed)
        if cfg.resume_from:
            self.resume(cfg.resume_from)
        if self.cfg.train.report_to:
            self.acc.init_trackers("humanline", config=_flat(self.cfg.to_dict()))
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not (cfg.progress and self.acc.is_main_process),
                   desc=f"{self.settings.objective}{' humanline' if self.cfg.humanline.enabled else ''}",
                   dynamic_ncols=True)
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            examples = self.source.examples_for_step(self.step)
            gen = getattr(self.source, "last_generation_time", 0.0)
            t1 = time.perf_counter()
            metrics = self.train_step(examples)
            t2 = time.perf_counter()
            self.generation_time += gen
            self.train_time += (t2 - t1) + (t1 - t0 - gen)
            metrics.update(getattr(self.source, "last_metrics", {}) or {})
            metrics["tokens_per_second"] = metrics["num_tokens"] / max(t2 - t1, 1e-9)
            self.step += 1
            metrics["step"] = self.step
            metrics["time/train"] = self.train_time
            metrics["time/generation"] = self.generation_time
            if self.cfg.eval.every and self.step % self.cfg.eval.every == 0 and self.step < cfg.max_steps:
                metrics.update(self.evaluate())
            self.history.append(metrics)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self._log_line(metrics)
                if cfg.report_to:
                    self.acc.log({k: v for k, v in metrics.items() if k != "step"}, step=self.step)
            bar.set_postfix(_postfix(metrics), refresh=False)
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                self.save()
            if self.stop_when is not None and self.stop_when(metrics):
                self._log_line({"event": "stopped_early", "step": self.step})
                break
        bar.close()
        final = self.evaluate() if (self.eval_examples or self.evaluators) else {}
        if final:
            final["step"] = self.step
            self.history.append(final)
            self._log_line(final)
        if cfg.save_final:
            self.save()
            self.save_final_model(self.run_dir / "final")
        if cfg.report_to:
            self.acc.end_training()
        return TrainResult(model=self.unwrapped, run_dir=str(self.run_dir), step=self.step, history=self.history,
                           train_time=self.train_time, generation_time=self.generation_time)


def _host_floats(values: list[Any]) -> list[float]:
    """``[float(v) for v in values]`` with one device-to-host copy per device rather than one sync per tensor
    (values: scalar tensors of any dtype and device, or numbers). The float64 cast is exact, as float() is."""
    out: list[Any] = list(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, Tensor):
            by_device.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for idx in by_device.values():
        flat = torch.stack([values[i].detach().reshape(()).to(torch.float64) for i in idx]).tolist()
        for i, f in zip(idx, flat):
            out[i] = f
    return out


def _sum_metrics(parts: list[tuple[Tensor, float, dict[str, Any]]]) -> dict[str, float]:
    """Per micro-batch (loss, weight, metrics) -> {"loss": sum of losses, metric: sum of value * weight}, summed
    in micro-batch order (the same floats as converting each value as it comes). Each loss is this process's
    share of the global loss (global denominators), so the sum over processes is the step's loss."""
    flat: list[Any] = []
    for loss, _, metrics in parts:
        flat.append(loss)
        flat.extend(metrics.values())
    values = iter(_host_floats(flat))
    sums: dict[str, float] = {}
    for _, weight, metrics in parts:
        sums["loss"] = sums.get("loss", 0.0) + next(values)
        for k in metrics:
            sums[k] = sums.get(k, 0.0) + next(values) * weight
    return sums


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _postfix(m: dict[str, float]) -> dict[str, str]:
    keys = ("loss", "rewards/margins", "reward", "humanline/unclamped", "tokens_per_second")
    short = {"rewards/margins": "margin", "humanline/unclamped": "unclamped", "tokens_per_second": "tok/s"}
    return {short.get(k, k): f"{m[k]:.3g}" for k in keys if k in m}
