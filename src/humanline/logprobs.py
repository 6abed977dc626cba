"""Per-token log-probs of labels without a full-vocabulary fp32 log-softmax of the whole batch.

``log p(y) = logit_y - logsumexp(logits)``, computed chunk by chunk in fp32 (or fp64 for fp64
logits). A custom autograd function keeps only the logits (no fp32 copy) and the [B, T] logsumexp
for backward, where it recomputes the softmax chunk by chunk: the gradient is
``d log p(y) / d logits = onehot(y) - softmax(logits)``. Peak extra memory is one chunk, about
``_CHUNK_ELEMENTS`` fp32 values, whatever B, T and V.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["sequence_logprobs", "token_logprobs"]

# fp32 elements per chunk (64 MiB): small next to a GPU's memory, large enough that the loop is short
# (e.g. ~110 tokens per chunk at a 150k vocabulary)
_CHUNK_ELEMENTS = 1 << 24


def _chunks(b: int, t: int, v: int) -> Iterator[tuple[slice, slice]]:
    """Slices of [B, T] covering it, each holding at most ``_CHUNK_ELEMENTS`` logits (or one token).

    Whole rows are grouped when a row fits; otherwise one row is cut along T. Slicing the first two
    dims of a [B, T, V] tensor gives views, so non-contiguous logits (``logits[:, :-1]``) are
    never copied.
    """
    if t * v <= _CHUNK_ELEMENTS:
        rows = max(1, _CHUNK_ELEMENTS // max(t * v, 1))
        for b0 in range(0, b, rows):
            yield slice(b0, b0 + rows), slice(0, t)
    else:
        toks = max(1, _CHUNK_ELEMENTS // max(v, 1))
        for b0 in range(b):
            for t0 in range(0, t, toks):
                yield slice(b0, b0 + 1), slice(t0, t0 + toks)


class _TokenLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, valid: Tensor) -> Tensor:  # type: ignore[override]
        dt = torch.promote_types(logits.dtype, torch.float32)
        b, t, v = logits.shape
        out = torch.zeros((b, t), dtype=dt, device=logits.device)
        lse = torch.zeros((b, t), dtype=dt, device=logits.device)
        for sb, st in _chunks(b, t, v):
            chunk = logits[sb, st].to(dt)
            c_lse = torch.logsumexp(chunk, dim=-1)
            picked = chunk.gather(-1, labels[sb, st].unsqueeze(-1)).squeeze(-1)
            lse[sb, st] = c_lse
            out[sb, st] = picked - c_lse
        out = torch.where(valid, out, torch.zeros((), dtype=dt, device=out.device))
        ctx.save_for_backward(logits, labels, valid, lse)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        logits, labels, valid, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # ignored positions output a constant 0: their gradient is 0 whatever grad_out holds there
        g = torch.where(valid, grad_out.to(lse.dtype), torch.zeros((), dtype=lse.dtype,
                                                                   device=lse.device))
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        b, t, v = logits.shape
        # fp32 / fp64 logits: each chunk is computed straight into the gradient (no chunk temporary, no copy)
        in_place = logits.dtype == lse.dtype
        for sb, st in _chunks(b, t, v):
            g_c = g[sb, st].unsqueeze(-1)
            # -g * softmax, then + g at the label: d(logit_y - lse)/d logits = onehot(y) - softmax
            if in_place:
                p = torch.sub(logits[sb, st], lse[sb, st].unsqueeze(-1), out=grad[sb, st])
            else:
                p = logits[sb, st].to(lse.dtype) - lse[sb, st].unsqueeze(-1)
            p.exp_().mul_(-g_c)
            p.scatter_add_(-1, labels[sb, st].unsqueeze(-1), g_c)
            if not in_place:
                grad[sb, st] = p.to(grad.dtype)
        return grad, None, None


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Log-probability of each label: ``out[b, t] = log softmax(logits[b, t])[labels[b, t]]``.

    ``logits`` [B, T, V] (any float dtype; bf16/fp16 are upcast chunk by chunk) and ``labels``
    [B, T] are already aligned (the caller shifts). Returns [B, T] in fp32 (fp64 for fp64 logits),
    0 where ``labels == ignore_index``. Differentiable with respect to ``logits``; never holds an
    fp32 [B, T, V] tensor, in forward or backward (beyond the gradient itself, in logits' dtype).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"token_logprobs needs logits [B, T, V] and labels [B, T], got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    valid = labels != ignore_index
    # any in-range index at ignored positions; their output is overwritten with 0
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return _TokenLogProbs.apply(logits, safe, valid)


def _no_cache(model: torch.nn.Module) -> dict[str, bool]:
    """``{"use_cache": False}`` for a transformers-style model (its config has ``use_cache``), else ``{}``.

    A transformers model called without it builds a KV cache in every scoring forward: under ``no_grad`` (the
    reference) every layer's keys and values then stay alive until the forward returns. Wrappers (DDP,
    accelerate, PEFT) pass the keyword through; a plain module keeps its own signature.
    """
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP / accelerate wrappers
        inner = inner.module
    config = getattr(inner, "config", None)
    return {"use_cache": False} if hasattr(config, "use_cache") else {}


def sequence_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor,
                      labels: Tensor) -> tuple[Tensor, Tensor]:
    """Forward ``model`` and return shifted per-token log-probs and the response mask.

    ``labels`` are HF-aligned (not shifted; -100 on prompt and padding). Returns ``(logps, mask)``,
    both [B, T-1]: ``logps[:, t] = log p(labels[:, t+1] | input_ids[:, :t+1])`` (0 where ignored)
    and ``mask = labels[:, 1:] != -100``.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, **_no_cache(model)).logits
    shifted = labels[:, 1:]
    # logits[:, :-1] is a view; token_logprobs slices it without copying
    return token_logprobs(logits[:, :-1], shifted), shifted != -100
