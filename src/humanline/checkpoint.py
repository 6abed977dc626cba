"""Training-state checkpoints, written atomically, and resuming from them.

A checkpoint is the folder ``run_dir/checkpoints/step-{step:08d}/``::

    config.json, model.safetensors, tokenizer files  the model as save_model writes it (for a PEFT
                                                     model: adapter_config.json, adapter_model.safetensors)
    optimizer.pt, scheduler.pt                       torch.save of state dicts (tensors and primitives only)
    rng-{rank}.safetensors, rng-{rank}.json          each process's RNG states
    reference.safetensors                            the reference model's weights, when it has its own
    deepspeed/                                       under DeepSpeed ZeRO-3: its partitioned states (fp32 master
                                                     weights, optimizer; no optimizer.pt then)
    trainer_state.json                               counters, data position, ...; the completeness marker

It is written into ``step-XXXXXXXX.tmp-*`` and renamed into place, so a killed process leaves at most a
temporary folder, which :func:`find_checkpoint` ignores and the next save removes. Nothing is unpickled
on load: ``torch.load(weights_only=True)`` for optimizer and scheduler, safetensors and JSON for the rest.

Several processes: one process (the main one) calls :func:`save_checkpoint`, passing every process's
:func:`capture_rng` result (gathered by the trainer) as ``rng_states``; each process then calls
:func:`load_checkpoint` with its own ``process_index``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from humanline.errors import HumanlineError
from humanline.models import atomic_directory, is_peft_model, unwrap_model, write_model

CHECKPOINTS = "checkpoints"
MARKER = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------------------------------------- RNG

def capture_rng() -> dict[str, Any]:
    """This process's RNG states: torch CPU (and CUDA) as tensors, python's (and numpy's) as JSON lists."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _to_json(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    if "numpy" in sys.modules:  # only if something uses numpy; never import it just for this
        state["numpy"] = _to_json(sys.modules["numpy"].random.get_state())
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set this process's RNGs from a :func:`capture_rng` result (states it lacks are left alone)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if state.get("numpy") is not None:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _to_json(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    return value


def _write_rng(folder: str, rank: int, state: dict[str, Any]) -> None:
    tensors = {"torch": state["torch"].contiguous()}
    for i, t in enumerate(state.get("cuda") or []):
        tensors[f"cuda.{i}"] = t.contiguous()
    save_file(tensors, os.path.join(folder, f"rng-{rank}.safetensors"))
    meta = {"python": state["python"], "numpy": state.get("numpy"), "num_cuda": len(state.get("cuda") or [])}
    _write_json(os.path.join(folder, f"rng-{rank}.json"), meta)


def _read_rng(folder: str, rank: int) -> dict[str, Any]:
    tensors = load_file(os.path.join(folder, f"rng-{rank}.safetensors"))
    with open(os.path.join(folder, f"rng-{rank}.json")) as f:
        meta = json.load(f)
    return {"torch": tensors["torch"], "python": meta["python"], "numpy": meta.get("numpy"),
            "cuda": [tensors[f"cuda.{i}"] for i in range(meta.get("num_cuda", 0))]}


# ---------------------------------------------------------------------------------------------- helpers

def _write_json(path: str, data: Any) -> None:
    try:
        text = json.dumps(data, indent=2, allow_nan=True)
    except TypeError as err:
        raise HumanlineError(f"{os.path.basename(path)}: state must be JSON-serialisable ({err})") from err
    with open(path, "w") as f:
        f.write(text)


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU contiguous tensors, no two sharing memory (safetensors refuses shared ones, e.g. tied weights)."""
    out, seen = {}, set()
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[key] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out


def _is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MARKER))


def _complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint in ``ckpt_dir``, oldest first; temp folders are skipped."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _STEP_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and _is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _remove_temps(ckpt_dir: str) -> None:
    """Remove leftovers of an interrupted save (``*.tmp-*``): only one process saves, so none is live."""
    for name in os.listdir(ckpt_dir):
        if ".tmp" in name:
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------------------------------- API

def save_checkpoint(run_dir: str | os.PathLike, step: int, *, model: Any, tokenizer: Any = None,
                    optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                    trainer_state: dict[str, Any], reference_state: dict[str, torch.Tensor] | None = None,
                    rng_states: list[dict[str, Any]] | None = None, keep_last: int | None = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer_state: dict[str, Any] | None = None,
                    move_in: dict[str, str] | None = None) -> str:
    """Write a complete checkpoint for ``step`` atomically and return its path. Main process only.

    ``model_state`` / ``optimizer_state``: full state dicts to write instead of ``model.state_dict()`` /
    ``optimizer.state_dict()`` (a sharded run gathers them first, on every process; see ``sharding.py``).
    ``move_in``: {name: folder} folders to move into the checkpoint as ``name`` (DeepSpeed's partitioned states,
    which every process wrote beforehand; see ``zero3.py``).

    ``rng_states`` holds one :func:`capture_rng` result per process (index = process index); None
    captures this process's alone. ``trainer_state`` must be JSON-serialisable. With ``keep_last`` only
    the newest ``keep_last`` complete checkpoints remain afterwards.
    """
    if rng_states is None:
        rng_states = [capture_rng()]  # before anything else can draw a random number
    ckpt_dir = os.path.join(os.fspath(run_dir), CHECKPOINTS)
    os.makedirs(ckpt_dir, exist_ok=True)
    _remove_temps(ckpt_dir)
    final = os.path.join(ckpt_dir, f"step-{int(step):08d}")
    with atomic_directory(final) as tmp:
        write_model(model, tokenizer, tmp, state_dict=model_state)
        if optimizer_state is not None:
            torch.save(optimizer_state, os.path.join(tmp, "optimizer.pt"))
        elif optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        if scheduler is not None:
            torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        for rank, state in enumerate(rng_states):
            _write_rng(tmp, rank, state)
        if reference_state is not None:
            save_file(_unshared(reference_state), os.path.join(tmp, "reference.safetensors"))
        for name, folder in (move_in or {}).items():
            os.replace(folder, os.path.join(tmp, name))
        state = {**trainer_state, "step": trainer_state.get("step", int(step))}
        _write_json(os.path.join(tmp, MARKER), state)  # last: the marker of a complete checkpoint
    if keep_last is not None and keep_last > 0:
        for _, old in _complete_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir_or_path: str | os.PathLike, resume_from: str | None) -> str | None:
    """The checkpoint to resume from.

    ``resume_from`` None or "" -> None; "auto" -> the newest complete checkpoint under
    ``run_dir_or_path/checkpoints`` (None if there is none); anything else is a checkpoint path, which
    must exist and be complete.
    """
    if not resume_from:
        return None
    if resume_from == "auto":
        found = _complete_checkpoints(os.path.join(os.fspath(run_dir_or_path), CHECKPOINTS))
        return found[-1][1] if found else None
    path = os.fspath(resume_from)
    if not os.path.isdir(path):
        raise HumanlineError(f"checkpoint not found: {path}")
    if not _is_complete(path):
        raise HumanlineError(f"checkpoint is incomplete (no {MARKER}): {path}")
    return path


def _load_full_weights(model: torch.nn.Module, folder: str,
                       load_state: Callable[[dict[str, torch.Tensor]], None] | None = None) -> None:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise HumanlineError(f"checkpoint has no model weights (model.safetensors): {folder}")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    if load_state is not None:
        load_state(state)
        return
    result = model.load_state_dict(state, strict=False)
    # save_pretrained drops tied copies (lm_head.weight tied to the embeddings): a missing key is fine
    # when its parameter is the very tensor of a key that was loaded.
    own = model.state_dict(keep_vars=True)
    loaded = {id(p) for k, p in own.items() if k in state}
    missing = [k for k in result.missing_keys if id(own[k]) not in loaded]
    if result.unexpected_keys or missing:
        bad = (missing or result.unexpected_keys)[0]
        raise HumanlineError(f"checkpoint weights do not fit the model ({len(missing)} missing, "
                             f"{len(result.unexpected_keys)} unexpected, e.g. '{bad}'): {folder}")


def load_checkpoint(path: str | os.PathLike, *, model: Any, optimizer: torch.optim.Optimizer | None = None,
                    scheduler: Any = None, process_index: int = 0, restore_rng_state: bool = True,
                    load_model_state: Callable[[dict[str, torch.Tensor]], None] | None = None,
                    load_optimizer_state: Callable[[dict[str, Any]], None] | None = None,
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Load a checkpoint into ``model`` (full or PEFT), ``optimizer`` and ``scheduler`` in place.

    Restores this process's RNG states (rank 0's if the checkpoint has none for it) and returns
    ``(trainer_state, reference_state or None)``. ``load_model_state`` / ``load_optimizer_state``, when given,
    receive the full model weights / optimizer state read from the checkpoint and load them instead of
    ``model.load_state_dict`` / ``optimizer.load_state_dict`` (a sharded model keeps its shards of them).
    """
    folder = os.fspath(path)
    if not _is_complete(folder):
        raise HumanlineError(f"checkpoint is missing or incomplete (no {MARKER}): {folder}")
    inner = unwrap_model(model)
    if is_peft_model(inner):
        from peft import set_peft_model_state_dict

        adapter = os.path.join(folder, "adapter_model.safetensors")
        if not os.path.exists(adapter):
            raise HumanlineError(f"checkpoint has no adapter weights but the model has LoRA: {folder}")
        set_peft_model_state_dict(inner, load_file(adapter))
    else:
        if os.path.exists(os.path.join(folder, "adapter_config.json")):
            raise HumanlineError(f"checkpoint holds a LoRA adapter but the model has none: {folder}")
        _load_full_weights(inner, folder, load_model_state)
    for obj, name in ((optimizer, "optimizer.pt"), (scheduler, "scheduler.pt")):
        if obj is None:
            continue
        file = os.path.join(folder, name)
        if not os.path.exists(file):
            raise HumanlineError(f"checkpoint has no {name}: {folder}")
        # weights_only: tensors and primitives only, nothing unpickled. map_location="cpu" because
        # Optimizer.load_state_dict moves each state to its parameter's device itself.
        state = torch.load(file, map_location="cpu", weights_only=True)
        if obj is optimizer and load_optimizer_state is not None:
            load_optimizer_state(state)
        else:
            obj.load_state_dict(state)
    if restore_rng_state:
        rank = process_index if os.path.exists(os.path.join(folder, f"rng-{process_index}.json")) else 0
        restore_rng(_read_rng(folder, rank))
    with open(os.path.join(folder, MARKER)) as f:
        trainer_state = json.load(f)
    ref_path = os.path.join(folder, "reference.safetensors")
    reference_state = load_file(ref_path) if os.path.exists(ref_path) else None
    return trainer_state, reference_state
