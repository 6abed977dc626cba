"""Short runs of a tiny model under FSDP or DeepSpeed ZeRO-3, for tests/test_distributed.py (which runs the same
configs in one process and compares).

On a CPU-only machine (gloo; humanline.sharding.make_accelerator turns accelerate's DDP into FSDP or DeepSpeed
there):

    ACCELERATE_USE_FSDP=true FSDP_VERSION=2 FSDP_AUTO_WRAP_POLICY=TRANSFORMER_BASED_WRAP OMP_NUM_THREADS=1 \\
        torchrun --nproc_per_node 2 tests/scripts/fsdp_runs.py OUT [RUN ...]
    ACCELERATE_USE_DEEPSPEED=true ACCELERATE_DEEPSPEED_ZERO_STAGE=3 DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 \\
        torchrun --nproc_per_node 2 tests/scripts/fsdp_runs.py OUT [RUN ...]

Writes OUT/<run>/params.safetensors (the gathered final policy) for every run in RUNS (or those named),
OUT/<run>/final/ (save_pretrained, where the run saves one) and OUT/checks.json: per run and step, which
step's start-of-step weights the reference holds after the step and how far it is from them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_rows  # noqa: E402

from humanline.config import load_config  # noqa: E402
from humanline.run import prepare_offline  # noqa: E402
from humanline.sharding import full_state_dict, local  # noqa: E402
from humanline.tiny import build_model, build_tokenizer  # noqa: E402
from humanline.trainer import DatasetSource, Trainer  # noqa: E402

# name -> (objective, overrides). 1 process runs them with GA 4, 2 processes with GA 2 (micro-batches of 2).
RUNS: dict[str, tuple[str, list[str]]] = {
    # checkpoints at step 2 and saves the final model; "dpo_resumed" resumes from that checkpoint
    "dpo_sync1": ("dpo", ["humanline.enabled=true", "reference.sync_every=1", "train.save_every=2",
                          "train.save_final=true"]),
    "dpo_sync2": ("dpo", ["humanline.enabled=true", "reference.sync_every=2", "train.max_steps=4",
                          "data.eval_size=8", "eval.every=2"]),
    "kto": ("kto", ["humanline.enabled=true"]),
    "grpo": ("grpo", ["humanline.enabled=true", "loss.loss_type=dapo"]),
}
# Run only when named: clipping active (the gradient norms above are ~0.3), for DeepSpeed, which clips inside its
# own step (gradient_clipping) where FSDP's runs clip in the trainer.
MORE_RUNS: dict[str, tuple[str, list[str]]] = {
    "dpo_clip": ("dpo", ["humanline.enabled=true", "optim.max_grad_norm=0.1"]),
}


def build(out: str | Path, objective: str, overrides: list[str]) -> Trainer:
    base = {"model": {"name_or_path": "tiny"}, "data": {"train": "rows", "max_length": 48, "max_prompt_length": 16},
            "loss": {"objective": objective}, "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 2, "output_dir": str(out),
                      "progress": False, "save_final": False}}
    cfg = load_config(None, overrides, base=base)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, seed=0)
    train_ex, eval_ex, _ = prepare_offline(cfg, tok, tiny_rows(objective, 32))
    return Trainer(cfg, model, tok, DatasetSource(train_ex, cfg.train.batch_size, cfg.train.seed),
                   eval_examples=eval_ex)


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", p.numel())  # under ZeRO-3 a parameter is empty outside a forward


def watch_reference(trainer: Trainer) -> list[dict]:
    """Wrap train_step: gather the policy before each step and the reference after it (collectives)."""
    records: list[dict] = []
    starts: dict[int, dict[str, torch.Tensor]] = {}
    inner = trainer.train_step

    def step(examples: list) -> dict:
        starts[trainer.step] = full_state_dict(trainer.model)
        metrics = inner(examples)
        ref = trainer.reference
        if ref is not None and ref.model is not None:
            after = full_state_dict(ref.model)
            if trainer.acc.is_main_process:
                start = starts.get(ref.last_sync_step)  # a resumed run did not see the steps before it
                diff = None if start is None else max(float((after[k] - start[k]).abs().max()) for k in start)
                records.append({"step": trainer.step, "holds": ref.last_sync_step, "max_diff": diff})
        return metrics

    trainer.train_step = step  # type: ignore[method-assign]
    return records


def main() -> None:
    out, *names = sys.argv[1:]
    torch.set_num_threads(1)
    checks: dict[str, dict] = {}
    for name in names or [*RUNS, "dpo_resumed"]:
        if name == "dpo_resumed":
            objective, overrides = RUNS["dpo_sync1"]
            ckpt = os.path.join(out, "dpo_sync1", "checkpoints", "step-00000002")
            resume = ["train.save_every=0", "train.save_final=false", f"train.resume_from={ckpt}"]
            trainer = build(os.path.join(out, name), objective, [*overrides, *resume])
        else:
            objective, overrides = {**RUNS, **MORE_RUNS}[name]
            trainer = build(os.path.join(out, name), objective, overrides)
        records = watch_reference(trainer)
        trainer.train()
        state = full_state_dict(trainer.model)
        if trainer.acc.is_main_process:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, name, "params.safetensors"))
            checks[name] = {"distributed_type": trainer.acc.distributed_type.name,
                            "num_processes": trainer.acc.num_processes,
                            "policy": type(trainer.model).__name__,
                            "reference": type(trainer.reference.model).__name__ if trainer.reference else None,
                            # elements held by this process: its shards of the policy and of the reference
                            "numel": {"full": sum(_numel(p) for p in trainer.model.parameters()),
                                      "policy_local": sum(local(p).numel() for p in trainer.model.parameters()),
                                      "reference_local": sum(local(p).numel()
                                                             for p in trainer.reference.model.parameters())},
                            "steps": records, "history": trainer.history}
    if checks:
        Path(out, "checks.json").write_text(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
