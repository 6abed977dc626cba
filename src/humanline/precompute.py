"""Reference log-probs computed once, before training, for frozen-reference runs on a fixed data set.

With a frozen reference (the initial model) the reference log-probs of a fixed data set never change, so one
pass of the initial model over every example replaces a reference forward per step and, above all, the
reference copy of the model in memory (the trainer builds none when ``reference.precompute`` is on).

Each example gets the reference log-prob of every completion token: ``ref_logps`` (sft, grpo) or
``ref_chosen_logps`` / ``ref_rejected_logps`` (dpo), as 1-D float32 tensors that ``collate`` aligns with the
shifted labels. KTO is not supported (config.py refuses it): its KL rows pair each example with another
completion of its micro-batch, a pairing that changes every step.

The values are cached in ``cache_dir/ref-logps-{fingerprint}.safetensors`` (one flat float32 tensor and int64
offsets, written atomically); a later run with the same fingerprint loads them instead of recomputing. The
fingerprint (:func:`fingerprint`) is a sha256 of the model's identity, the examples' token ids and the length
limits.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .data import collate
from .logprobs import sequence_logprobs
from .objectives import LossSettings
from .reference import _is_peft, _unwrap

__all__ = ["REF_KEYS", "attach_reference_logps", "fingerprint", "model_digest", "precompute_reference_logps",
           "should_precompute"]

# The example fields each objective's precomputed values go to, and the token ids they score.
REF_KEYS = {"sft": {"ref_logps": "completion_ids"}, "grpo": {"ref_logps": "completion_ids"},
            "dpo": {"ref_chosen_logps": "chosen_ids", "ref_rejected_logps": "rejected_ids"}}
_VERSION = "humanline-ref-logps-v1"


def should_precompute(cfg: Any) -> bool:
    """Whether a run precomputes: ``reference.precompute`` is on and its loss uses the reference at all (not sft,
    nor grpo without a KL term)."""
    settings = LossSettings(objective=cfg.loss.objective, kl_beta=cfg.loss.kl_beta, humanline=cfg.humanline_bounds)
    return cfg.reference.precompute and settings.needs_reference


def _keys(objective: str) -> dict[str, str]:
    if objective not in REF_KEYS:
        raise ValueError(f"precomputed reference log-probs support {', '.join(REF_KEYS)}, not '{objective}'"
                         + (" (its KL rows pair examples differently every step)" if objective == "kto" else ""))
    return REF_KEYS[objective]


def _reference_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The parameters the frozen reference is made of: all of them, or a LoRA model's frozen base weights."""
    model = _unwrap(model)
    peft = _is_peft(model)
    return [(n, p) for n, p in model.named_parameters() if not (peft and p.requires_grad)]


def model_digest(model: nn.Module, *, samples: int = 8, elements: int = 1 << 16) -> bytes:
    """A fast sha256 of an in-memory model: every parameter's name, shape and dtype, and the bytes of the first
    ``elements`` values of ``samples`` parameters spread evenly over the network (embeddings to head).

    A sample, for speed (a full hash of an 8B model reads 16 GB): two models that differ only outside the sampled
    values would share a digest, which fine-tuning or a different checkpoint does not produce in practice.
    """
    h = hashlib.sha256()
    params = _reference_params(model)
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    picks = sorted({round(k * (len(params) - 1) / max(samples - 1, 1)) for k in range(samples)}) if params else []
    for i in picks:
        values = params[i][1].detach().reshape(-1)[:elements].cpu().contiguous()
        h.update(values.view(torch.uint8).numpy().tobytes())
    return h.digest()


def fingerprint(model: nn.Module, examples: Sequence[Mapping[str, Any]], objective: str, *,
                max_prompt_length: int, max_length: int, identity: str = "") -> str:
    """sha256 (hex) of the model (``identity``, e.g. name, revision and dtype, plus :func:`model_digest`), the
    objective, the length limits and every example's prompt and completion ids (the tokenisation)."""
    h = hashlib.sha256(f"{_VERSION}|{objective}|{max_prompt_length}|{max_length}|{identity}|".encode())
    h.update(model_digest(model))
    fields = ("prompt_ids", *_keys(objective).values())
    for e in examples:
        for f in fields:
            ids = e[f]
            h.update(len(ids).to_bytes(8, "little"))
            h.update(array("q", ids).tobytes())
    return h.hexdigest()


def cache_path(cache_dir: str | os.PathLike, fp: str) -> Path:
    return Path(cache_dir) / f"ref-logps-{fp}.safetensors"


@torch.inference_mode()
def _compute(model: nn.Module, examples: Sequence[Mapping[str, Any]], objective: str, pad_token_id: int,
             batch_size: int) -> list[Tensor]:
    """Per example and key (in ``_keys`` order), the reference log-probs of the completion tokens."""
    base = _unwrap(model)
    device = next(base.parameters()).device
    was_training = base.training
    base.eval()
    keys = list(_keys(objective).values())
    out: list[Tensor] = []
    try:
        with base.disable_adapter() if _is_peft(base) else nullcontext():  # LoRA: the reference is the base
            for start in range(0, len(examples), batch_size):
                chunk = examples[start:start + batch_size]
                batch = collate(chunk, objective, pad_token_id=pad_token_id)
                logps, _ = sequence_logprobs(base, *(batch[k].to(device) for k in
                                                     ("input_ids", "attention_mask", "labels")))
                logps = logps.float().cpu()
                b = len(chunk)
                for i, e in enumerate(chunk):
                    p = len(e["prompt_ids"])
                    for j, ids in enumerate(keys):  # collate's rows: DPO chosen rows, then rejected rows
                        out.append(logps[j * b + i, p - 1 : p - 1 + len(e[ids])].clone())
    finally:
        base.train(was_training)
    return out


def _load(path: Path, lengths: list[int]) -> list[Tensor] | None:
    """The cached values, or None when the file is missing, unreadable or does not match the examples."""
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    flat, offsets = tensors.get("logps"), tensors.get("offsets")
    if flat is None or offsets is None or offsets.numel() != len(lengths) + 1 \
            or (offsets[1:] - offsets[:-1]).tolist() != lengths:
        return None
    return list(flat.split(lengths))


def _save(path: Path, values: list[Tensor], fp: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lengths = torch.tensor([0, *(len(v) for v in values)], dtype=torch.int64)
    tensors = {"logps": torch.cat(values) if values else torch.zeros(0), "offsets": lengths.cumsum(0)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"fingerprint": fp, "format": _VERSION})
    os.replace(tmp, path)


def precompute_reference_logps(model: nn.Module, examples: Sequence[Mapping[str, Any]], objective: str, *,
                               pad_token_id: int, batch_size: int, cache_dir: str | os.PathLike | None,
                               fingerprint: str | None = None) -> list[dict[str, Any]]:
    """Copies of ``examples`` with the frozen reference's log-probs of their completion tokens added.

    ``model`` is the reference, i.e. the initial policy (a LoRA model's adapter is disabled), run once over all
    examples under ``torch.inference_mode()`` in micro-batches of ``batch_size`` on its own device. With a
    ``cache_dir`` the values are loaded from (else written to) ``ref-logps-{fingerprint}.safetensors`` there.
    """
    keys = _keys(objective)
    lengths = [len(e[ids]) for e in examples for ids in keys.values()]
    path = None
    if cache_dir is not None:
        if not fingerprint:
            raise ValueError("a cache_dir needs the fingerprint of model and data (precompute.fingerprint)")
        path = cache_path(cache_dir, fingerprint)
    values = _load(path, lengths) if path is not None else None
    if values is None:
        values = _compute(model, examples, objective, pad_token_id, batch_size)
        if path is not None:
            _save(path, values, fingerprint)
    out, it = [], iter(values)
    for e in examples:
        out.append({**e, **{key: next(it) for key in keys}})
    return out


def attach_reference_logps(cfg: Any, model: nn.Module, tokenizer: Any, train_examples: list[dict[str, Any]],
                           eval_examples: list[dict[str, Any]], *, identity: str = ""
                           ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train and eval examples with precomputed reference log-probs, as ``humanline.train`` uses them.

    Runs in micro-batches of ``eval.batch_size`` on this process's accelerator device (the model goes back where
    it was); the main process computes and writes ``<train.output_dir>/cache`` first, so that the other processes
    load its files. ``identity`` names the model (name, revision, dtype) when it was loaded from the config.
    """
    from accelerate import PartialState

    state = PartialState()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    d, objective = cfg.data, cfg.loss.objective
    cache_dir = Path(cfg.train.output_dir) / "cache"
    home = next(model.parameters()).device
    out = []
    with state.main_process_first():
        model.to(state.device)
        try:
            for examples in (train_examples, eval_examples):
                fp = fingerprint(model, examples, objective, max_prompt_length=d.max_prompt_length,
                                 max_length=d.max_length, identity=identity) if examples else None
                out.append(precompute_reference_logps(model, examples, objective, pad_token_id=pad,
                                                      batch_size=cfg.eval.batch_size, cache_dir=cache_dir,
                                                      fingerprint=fp) if examples else [])
        finally:
            model.to(home)
    return out[0], out[1]
