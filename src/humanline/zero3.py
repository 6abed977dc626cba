"""DeepSpeed ZeRO-3: the engine driven step by step, a reference partitioned like the policy, checkpoints.

Under ZeRO-3 every parameter is flattened and cut into one equal partition per process (``p.ds_tensor``; outside
a forward ``p`` itself is empty). How the trainer uses it (``deepspeed`` is imported only when a run asks for it):

* **The optimizer step.** The trainer drives the engine itself instead of ``accelerator.backward`` (which would
  run ``engine.step()`` after every micro-batch): every micro-batch's backward is ``engine.backward(loss,
  scale_wrt_gas=False)`` (the losses are already normalised by the step's global counts, so no division by an
  accumulation count), with the accumulation boundary set on the last one only; then the trainer reads the
  gradient norm, syncs the reference (the parameters are still the pre-update ones) and calls ``engine.step()``
  once, which clips (DeepSpeed's ``gradient_clipping``, set to ``optim.max_grad_norm``) and updates.
* **The reference** is a second ZeRO-3 engine (no optimizer) over the reference copy, with the same number of
  processes, so every parameter's local partition is the same slice as the policy's: a humanline sync is
  ``ref.ds_tensor.copy_(policy.ds_tensor)`` per parameter, local, no gather, no full copy anywhere. It persists
  no parameter gathered (``stage3_param_persistence_threshold: 0``): its partitions are the only copy, so a sync
  cannot leave a stale gathered one behind.
* **Checkpoints** hold DeepSpeed's own partitioned states (``engine.save_checkpoint``: fp32 master weights and
  optimizer state, one file per process) in a ``deepspeed/`` folder of the trainer's atomic checkpoint, plus the
  gathered full weights (``model.safetensors``, as in any checkpoint) and the gathered reference. Resuming needs
  the same number of processes (DeepSpeed's partitioned optimizer state).
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import torch
from torch import Tensor, nn

from .errors import HumanlineError

ENGINE_DIR = "deepspeed"  # DeepSpeed's states inside a checkpoint folder
_TAG = "state"


def is_engine(model: Any) -> bool:
    """``model`` is a DeepSpeed engine (without importing deepspeed when nothing else did)."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def is_partitioned(t: Tensor) -> bool:
    """A ZeRO-3 parameter (its local partition is ``t.ds_tensor``)."""
    return hasattr(t, "ds_tensor")


# ------------------------------------------------------------------------------------------ accelerator

def enable_deepspeed_on_cpu(acc: Any) -> None:
    """Make a multi-process CPU (gloo) accelerator run DeepSpeed; call before anything is prepared.

    accelerate 1.15 enables DeepSpeed only on GPU-like devices; the plugin the ``ACCELERATE_DEEPSPEED_*`` variables
    describe (as ``accelerate launch`` sets them) was built by the Accelerator anyway and is activated here."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if acc.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"enable_deepspeed_on_cpu: expected a multi-process CPU accelerator, got "
                         f"{acc.distributed_type}")
    if acc._models:
        raise ValueError("enable_deepspeed_on_cpu: call it before preparing any model")
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(acc.mixed_precision)
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.DEEPSPEED
    AcceleratorState._shared_state["deepspeed_plugins"] = plugin
    plugin.select(_from_accelerator_state=True)


def configure(acc: Any, model: nn.Module, *, micro_batch_size: int, max_grad_norm: float | None) -> None:
    """Fill the accelerator's DeepSpeed config for this trainer, before ``acc.prepare``: ZeRO stage 3 only, the
    trainer's own optimizer and schedule, clipping = ``optim.max_grad_norm``, one micro-batch size (needed by
    ``prepare`` without a data loader; the trainer sets the accumulation boundary itself, so
    ``gradient_accumulation_steps`` stays 1 and never divides a loss)."""
    config = acc.state.deepspeed_plugin.deepspeed_config
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise HumanlineError(f"DeepSpeed ZeRO stage {stage} is not supported by the humanline trainer: use stage 3 "
                             f"(accelerate_configs/deepspeed_zero3.yaml), FSDP2 or DDP")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise HumanlineError(f"the DeepSpeed config has an '{key}' section: remove it, the humanline trainer "
                                 f"uses its own AdamW and schedule (optim.* in the recipe)")
    if any(is_partitioned(p) for p in model.parameters()):
        raise HumanlineError("the model was loaded already partitioned (DeepSpeed zero3_init_flag): set "
                             "zero3_init_flag: false; the humanline trainer partitions the policy and its reference "
                             "itself")
    gas = config.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise HumanlineError(f"DeepSpeed gradient_accumulation_steps={gas}: leave it at 1 (or auto), the humanline "
                             f"trainer accumulates train.batch_size / train.micro_batch_size micro-batches itself")
    clip = config.get("gradient_clipping", "auto")
    want = float(max_grad_norm or 0.0)
    if clip != "auto" and float(clip) != want:
        acc.print(f"humanline: DeepSpeed gradient_clipping {clip} replaced by optim.max_grad_norm ({want})")
    config.update({"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": 1,
                   "train_batch_size": micro_batch_size * acc.num_processes, "gradient_clipping": want})


def reference_engine(acc: Any, ref: nn.Module) -> nn.Module:
    """A ZeRO-3 engine (no optimizer) over the reference copy: partitions that line up with the policy's."""
    import deepspeed

    policy_config = acc.state.deepspeed_plugin.deepspeed_config
    zero = {k: v for k, v in policy_config["zero_optimization"].items() if not k.startswith("offload_optimizer")}
    zero.update({"stage": 3, "stage3_param_persistence_threshold": 0, "model_persistence_threshold": 0})
    zero = {k: (v if v != "auto" else None) for k, v in zero.items()}
    zero = {k: v for k, v in zero.items() if v is not None}
    config = {"zero_optimization": zero, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "train_batch_size": acc.num_processes}
    for precision in ("bf16", "fp16"):
        if policy_config.get(precision, {}).get("enabled") is True:
            config[precision] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    engine.eval()
    return engine


# ------------------------------------------------------------------------------------------ one optimizer step

def backward(engine: Any, loss: Tensor, last: bool) -> None:
    """One micro-batch's backward; ``last``: the step's accumulation boundary (reduce, then ``step``)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def grad_norm(engine: Any) -> float:
    """The global L2 norm of the step's accumulated gradients, before clipping (after the last backward,
    before ``engine.step()``); a collective. Each process adds up the squares of its gradient partitions."""
    from deepspeed.utils import safe_get_local_grad

    squares = torch.zeros((), dtype=torch.float64)
    for p in engine.module.parameters():
        if p.requires_grad:
            g = safe_get_local_grad(p)
            if g is not None:
                squares += g.detach().double().pow(2).sum().cpu()
    if torch.distributed.is_initialized():
        squares = squares.to(engine.device)
        torch.distributed.all_reduce(squares)
    return float(squares.sqrt())


def step(engine: Any) -> None:
    """Clip (``gradient_clipping``) and update, once: the boundary was set on the last backward."""
    engine.step()


def discard_gradients(engine: Any) -> None:
    """Skip the update: the next backward overwrites the accumulated gradient partitions instead of adding."""
    engine.optimizer.zero_grad()


# ------------------------------------------------------------------------------------------ full states

def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict on CPU in the main process ({} elsewhere), gathered parameter by parameter (never
    the whole model at once); a collective: every process must call it."""
    import deepspeed

    module = model.module if is_engine(model) else model
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    gathered: dict[int, Tensor] = {}
    out: dict[str, Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) not in gathered:  # tied weights appear under two names
            with deepspeed.zero.GatheredParameters([t] if is_partitioned(t) else []):
                gathered[id(t)] = t.detach().cpu().clone() if main else torch.empty(0)
        if main:
            out[name] = gathered[id(t)]
    return out


@torch.no_grad()
def load_partitions(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Set the partitions of a model without optimizer (the reference engine) from a full state dict that every
    process holds; each process copies its own slice, no communication. (The policy's weights are restored with
    its optimizer state by :func:`load_engine_state` instead.)"""
    module = model.module if is_engine(model) else model
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = dict(module.named_parameters(remove_duplicate=False))
    for name, p in params.items():
        if name not in state:
            continue  # a tied copy that save_pretrained dropped: its parameter is loaded under the other name
        flat = state[name].reshape(-1)
        if flat.numel() != p.ds_numel:
            raise HumanlineError(f"reference weights do not fit the model: {name} has {flat.numel()} elements, "
                                 f"expected {p.ds_numel}")
        part = p.ds_tensor
        start = rank * part.numel()
        chunk = flat[start:start + part.numel()]
        part.data[:chunk.numel()].copy_(chunk)
    missing = [n for n, p in params.items() if n not in state and not any(
        q is p and m in state for m, q in params.items())]
    if missing:
        raise HumanlineError(f"reference weights do not fit the model: '{missing[0]}' is missing")


# ------------------------------------------------------------------------------------------ checkpoints

def staging_dir(checkpoints_dir: str, step: int) -> str:
    """Where every process writes DeepSpeed's states before the main process moves them into the checkpoint
    folder (no ``.tmp`` in the name: the main process's save removes ``.tmp`` leftovers when it starts)."""
    return os.path.join(checkpoints_dir, f"deepspeed-staging-{int(step):08d}")


def save_engine_state(engine: Any, checkpoints_dir: str, step: int, *, is_main: bool) -> str:
    """Write DeepSpeed's partitioned states (fp32 master weights, optimizer) into the staging folder; a
    collective. Returns the folder, which :func:`humanline.checkpoint.save_checkpoint` moves into place."""
    folder = staging_dir(checkpoints_dir, step)
    if is_main:
        os.makedirs(checkpoints_dir, exist_ok=True)
        for name in os.listdir(checkpoints_dir):  # leftovers of an interrupted save
            if name.startswith("deepspeed-staging-"):
                shutil.rmtree(os.path.join(checkpoints_dir, name), ignore_errors=True)
    torch.distributed.barrier()
    engine.save_checkpoint(folder, tag=_TAG)
    torch.distributed.barrier()
    return folder


def load_engine_state(engine: Any, checkpoint: str) -> None:
    """Restore the policy's weights and optimizer state from a checkpoint written under DeepSpeed (same number
    of processes); every process calls it."""
    folder = os.path.join(checkpoint, ENGINE_DIR)
    if not os.path.isdir(folder):
        raise HumanlineError(f"checkpoint was not written under DeepSpeed (no {ENGINE_DIR}/ folder), so it has no "
                             f"partitioned optimizer state to resume under DeepSpeed: {checkpoint}")
    path, _ = engine.load_checkpoint(folder, tag=_TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise HumanlineError(f"DeepSpeed could not load the checkpoint (a different number of processes?): "
                             f"{folder}")
