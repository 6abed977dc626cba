"""Tests of humanline.logprobs: exactness, gradients, dtypes, chunking, peak memory."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import SimpleNamespace

import pytest
import torch

import humanline.logprobs as lp
from humanline.logprobs import sequence_logprobs, token_logprobs


def naive(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    out = torch.log_softmax(logits.float(), -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, 0.0)


def make(b: int, t: int, v: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 3).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return logits, labels


@pytest.mark.parametrize("chunk", [None, 7, 40, 10_000])  # one token, part of a row, rows, all
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_naive_values_and_gradients(dtype, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", chunk)
    logits, labels = make(3, 5, 11, dtype)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    got = token_logprobs(a, labels)
    exp = naive(b, labels)
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    assert torch.allclose(got, exp, atol=1e-5, rtol=1e-5)
    assert bool((got[labels == -100] == 0).all())
    w = torch.randn(3, 5)
    w[labels == -100] = float("nan")  # a gradient at ignored positions must not leak
    (torch.where(labels != -100, got * w, 0.0)).sum().backward()
    (torch.where(labels != -100, exp * w, 0.0)).sum().backward()
    assert a.grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(a.grad.float(), b.grad.float(), atol=tol, rtol=tol)
    assert bool((a.grad[labels == -100] == 0).all())


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 8)
    logits, labels = make(2, 3, 5, torch.float64, seed=1)
    x = logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, labels), (x,), fast_mode=True)
    assert token_logprobs(x, labels).dtype == torch.float64


def test_custom_ignore_index_and_bad_shapes():
    logits, labels = make(2, 4, 6, torch.float32)
    labels = torch.where(labels == -100, 5, labels)
    labels[1, 0] = 5
    got = token_logprobs(logits, labels, ignore_index=5)
    assert torch.allclose(got, naive(logits, labels, ignore_index=5), atol=1e-6)
    with pytest.raises(ValueError):
        token_logprobs(logits[0], labels[0])


def test_non_contiguous_logits():
    logits, labels = make(2, 6, 9, torch.float32)
    view = logits[:, :-1]  # what sequence_logprobs passes: a strided view
    assert not view.is_contiguous()
    assert torch.allclose(token_logprobs(view, labels[:, 1:]), naive(view, labels[:, 1:]), atol=1e-6)


class Toy(torch.nn.Module):
    """A causal toy model: the logits at t depend on tokens <= t (HF-style output)."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(v, 8)
        self.out = torch.nn.Linear(8, v)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids).cumsum(1) * attention_mask.unsqueeze(-1)
        return SimpleNamespace(logits=self.out(h))


def test_sequence_logprobs_shift_and_mask():
    torch.manual_seed(0)
    model = Toy(13)
    ids = torch.randint(0, 13, (2, 6))
    att = torch.ones(2, 6, dtype=torch.long)
    att[1, 4:] = 0
    labels = ids.clone()
    labels[:, :2] = -100  # prompt
    labels[1, 4:] = -100  # padding
    logps, mask = sequence_logprobs(model, ids, att, labels)
    assert logps.shape == mask.shape == (2, 5)
    assert mask.tolist() == [[False, True, True, True, True], [False, True, True, False, False]]
    full = torch.log_softmax(model(ids, att).logits, -1)
    # position t holds log p(labels[:, t+1] | input_ids[:, :t+1])
    assert logps[0, 2].item() == pytest.approx(full[0, 2, ids[0, 3]].item(), abs=1e-6)
    assert logps[1, 1].item() == pytest.approx(full[1, 1, ids[1, 2]].item(), abs=1e-6)
    assert bool((logps[~mask] == 0).all())
    logps[mask].sum().backward()
    assert model.out.weight.grad is not None and bool(model.out.weight.grad.abs().sum() > 0)


def test_chunks_bounded_and_nothing_large_saved(monkeypatch):
    """Each chunk holds at most _CHUNK_ELEMENTS logits; backward keeps only the logits and [B, T]."""
    monkeypatch.setattr(lp, "_CHUNK_ELEMENTS", 64)
    for b, t, v in [(3, 5, 11), (2, 40, 7), (4, 3, 200), (1, 1, 1)]:
        cells = torch.zeros(b, t, dtype=torch.long)
        for sb, st in lp._chunks(b, t, v):
            assert cells[sb, st].numel() * v <= max(64, v)
            cells[sb, st] += 1
        assert bool((cells == 1).all())  # an exact cover
    logits, labels = make(2, 8, 16, torch.bfloat16)
    logits.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        token_logprobs(logits, labels)
    big = [x for x in saved if x.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16  # the logits, no fp32 copy
    assert sum(x.numel() for x in saved if x.numel() < logits.numel()) <= 3 * 2 * 8


def _probe_memory() -> dict[str, int]:
    """Runs in a forked child: its high-water RSS starts at the current RSS, not the parent's peak."""
    import resource  # Unix only

    def rss() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    torch.set_num_threads(1)  # no OpenMP pool after fork
    lp._CHUNK_ELEMENTS = 1 << 18  # 1 MiB chunks, so that a small probe tells chunks from the whole
    b, t, v = 4, 64, 50000
    small = torch.randn(1, 2, 7, requires_grad=True)
    token_logprobs(small, torch.zeros(1, 2, dtype=torch.long)).sum().backward()  # warm-up
    # filled in place: no fp32 temporary
    logits = torch.empty(b, t, v, dtype=torch.bfloat16).uniform_(-3, 3).requires_grad_(True)
    labels = torch.randint(0, v, (b, t))
    r0 = rss()
    out = token_logprobs(logits, labels)
    r1 = rss()
    out.sum().backward()
    r2 = rss()
    with torch.no_grad():  # the naive way, to show that the probe sees such allocations
        torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1))
    r3 = rss()
    return {"full": b * t * v * 4, "grad": b * t * v * 2, "fwd": r1 - r0, "bwd": r2 - r1,
            "naive": r3 - r2}


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="needs Linux fork")
def test_peak_memory_bounded():
    # a forked child (not a fresh interpreter: importing torch again costs seconds) measures its
    # peak RSS growth around the call
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(rfd)
            os.write(wfd, json.dumps(_probe_memory()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(wfd)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("memory probe timed out")
        time.sleep(0.05)
    with os.fdopen(rfd) as f:
        raw = f.read()
    assert os.waitstatus_to_exitcode(status) == 0, raw
    m = json.loads(raw)
    full = m["full"]  # one fp32 [B, T, V] tensor: 51 MB
    assert m["naive"] > 0.9 * full, m  # the probe sees a full-size allocation
    assert m["fwd"] < 0.25 * full, m
    assert m["bwd"] < m["grad"] + 0.25 * full, m  # the gradient itself (bf16) plus chunks
