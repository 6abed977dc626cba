"""Sharded training (FSDP): the accelerator, the reference's shards, and full state dicts for saving.

Under FSDP (FSDP2) the policy's parameters are sharded over the processes. The reference copy is sharded the
same way, parameter by parameter (every parameter along dim 0 over the same mesh), so a humanline sync copies
each process's *local* shard, with no communication and no full copy of the model on any process. Saving
gathers full state dicts (a collective: every process calls it) and the main process writes them; loading
gives every process the full state dict and each keeps its shard. FSDP1 runs only on CUDA-like devices, so it
is untested here, and a reference copy under it is refused (see :func:`shard_like_policy`).

accelerate 1.15 turns FSDP on only for GPU-like devices: on a CPU-only machine a multi-process run with
``ACCELERATE_USE_FSDP=true`` silently becomes plain gloo DDP. :func:`make_accelerator` switches such a run to
FSDP on gloo, so the FSDP code paths run (and are tested) on CPUs too; likewise DeepSpeed
(``ACCELERATE_USE_DEEPSPEED=true``). The DeepSpeed ZeRO-3 specifics live in ``zero3.py``; :func:`is_sharded`,
:func:`local`, :func:`full_state_dict` and :func:`load_full_state_dict` cover its engines and partitions too.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch import Tensor, nn

from . import zero3
from .errors import HumanlineError


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def make_accelerator(**kwargs: Any) -> Accelerator:
    """``Accelerator(cpu=<no GPU>, **kwargs)``, with FSDP on CPUs when the launcher asked for it.

    ``accelerate launch --config_file accelerate_configs/fsdp.yaml`` (or ``ACCELERATE_USE_FSDP=true`` and the
    ``FSDP_*`` variables under torchrun) on a machine without GPUs gives several gloo processes that accelerate
    would run as DDP; here they run FSDP with the plugin those variables describe.
    """
    cpu = not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, **kwargs)
    if cpu and acc.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_FSDP"):
        enable_fsdp_on_cpu(acc)
    elif cpu and acc.distributed_type == DistributedType.MULTI_CPU and _env_flag("ACCELERATE_USE_DEEPSPEED"):
        zero3.enable_deepspeed_on_cpu(acc)
    return acc


def enable_fsdp_on_cpu(acc: Accelerator, plugin: FullyShardedDataParallelPlugin | None = None) -> None:
    """Make a multi-process CPU (gloo) accelerator run FSDP; call before anything is prepared.

    ``plugin`` defaults to the one the ``FSDP_*`` environment variables describe (as ``accelerate launch``
    sets them). The distributed type lives in accelerate's shared state, so it is set there.
    """
    if acc.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"enable_fsdp_on_cpu: expected a multi-process CPU accelerator, got {acc.distributed_type}")
    if acc._models:
        raise ValueError("enable_fsdp_on_cpu: call it before preparing any model")
    plugin = plugin or FullyShardedDataParallelPlugin()
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP


# --------------------------------------------------------------------------------------------- models

def is_fsdp2(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_fsdp1(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def is_sharded(model: nn.Module) -> bool:
    """The model (as the accelerator prepared it) is an FSDP1 or FSDP2 module, or a DeepSpeed ZeRO-3 engine."""
    return is_fsdp1(model) or is_fsdp2(model) or zero3.is_engine(model)


def local(t: Tensor) -> Tensor:
    """This process's shard of a (DTensor) parameter, or its partition of a ZeRO-3 one; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    if zero3.is_partitioned(t):
        return t.ds_tensor
    return t.to_local() if isinstance(t, DTensor) else t


def shard_like_policy(acc: Accelerator, ref: nn.Module) -> nn.Module:
    """Shard the reference copy as the accelerator will shard the policy, for local shard-to-shard syncs.

    FSDP2: every parameter is sharded along dim 0 over the same mesh as the policy's (which parameter sits in
    which FSDP unit does not change a local shard), with the plugin's mixed precision and offload policies, so
    the reference computes like the policy. Unlike the policy, every unit (the root too) frees its gathered
    parameters after each forward: the reference has no backward, and a sync writes into the shards.
    The reference is not registered with the accelerator (``clip_grad_norm_`` looks for the policy among the
    accelerator's models). FSDP1 is refused: it cannot run on CPU (torch requires a CUDA-like compute device),
    so it could not be tested here, and its root unit keeps its parameters gathered after a forward, which a
    shard-to-shard sync must not write around.
    """
    if not getattr(acc, "is_fsdp2", False):
        raise HumanlineError("a reference model under FSDP needs FSDP2 (fsdp_version: 2 in the accelerate config, "
                             "FSDP_VERSION=2); use reference.precompute=true for a frozen reference under FSDP1")
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = acc.state.fsdp_plugin
    mesh = getattr(acc, "torch_device_mesh", None)
    kwargs = {"reshard_after_forward": True, "offload_policy": plugin.cpu_offload,
              "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
              "mesh": mesh[tuple(acc.parallelism_config.fsdp_dim_names)] if mesh is not None else None}
    plugin.set_auto_wrap_policy(ref)
    wrap = fsdp2_prepare_auto_wrap_policy(plugin, ref)
    if wrap is not None:
        for module in get_module_children_bottom_up(ref)[:-1]:
            if wrap(module):
                fully_shard(module, **kwargs)
    fully_shard(ref, **kwargs)
    if any(p.is_meta for p in ref.parameters()):
        # Loaded with cpu_ram_efficient_loading, only the main process has weights: make room for the shards,
        # which Reference.copy_from fills from the prepared policy; buffers (e.g. rotary tables) keep their values.
        buffers = {n: b.detach().clone() for n, b in ref.named_buffers() if not b.is_meta}
        from torch.distributed.fsdp import CPUOffloadPolicy

        ref.to_empty(device="cpu" if isinstance(plugin.cpu_offload, CPUOffloadPolicy) else acc.device)
        with torch.no_grad():
            for name, value in buffers.items():
                ref.get_buffer(name).copy_(value)
    return ref


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's full state dict on CPU in the main process ({} elsewhere). A collective under FSDP: every
    process must call it; a model that is not sharded gives its own state dict everywhere."""
    if zero3.is_engine(model):
        return zero3.full_state_dict(model)
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a full state dict (given to every process) into a sharded model; each process keeps its shards.

    Keys that ``save_pretrained`` drops as tied copies (``lm_head.weight`` tied to the embeddings) are taken
    from the parameter they share; any other missing or unexpected key is an error."""
    if zero3.is_engine(model):
        zero3.load_partitions(model, state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    state = dict(state)
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    for group in names.values():
        present = [n for n in group if n in state]
        for n in group:
            if present:
                state.setdefault(n, state[present[0]])
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state on CPU in the main process ({} elsewhere); a collective.

    In the layout of a plain ``optimizer.state_dict()`` (parameters numbered in the optimizer's order), so a
    checkpoint's ``optimizer.pt`` is the same whether the run was sharded or not, and resumes either way."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, _inner(optimizer),
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:
        return {}
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a full optimizer state (given to every process, in :func:`full_optimizer_state_dict`'s layout) into a
    sharded run's optimizer; each process keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _optimizer_names(model, optimizer)
    by_name = {"state": {names[int(i)]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, _inner(optimizer), by_name, options=StateDictOptions(full_state_dict=True))


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter the optimizer updates, in the optimizer's order."""
    names = {id(p): name for name, p in model.named_parameters()}
    out = []
    for group in _inner(optimizer).param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise HumanlineError("the optimizer updates a parameter that is not the model's")
            out.append(names[id(p)])
    return out


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    while hasattr(optimizer, "optimizer") and isinstance(optimizer.optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer
