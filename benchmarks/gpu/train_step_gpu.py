"""Humanline-DPO training steps of a random-init ~0.5B-parameter Llama in bf16 on one GPU: tokens/s, peak memory.

    python benchmarks/gpu/train_step_gpu.py                            # 8 pairs x <=512 tokens, 10 steps
    python benchmarks/gpu/train_step_gpu.py --pairs 16 --seq-len 1024 --micro-batch 8 --steps 20
    python benchmarks/gpu/train_step_gpu.py --no-floor                 # humanline's trainer only

The model: LlamaConfig(hidden 1024, 24 layers, ffn 4096, 16 heads, vocab 49152, untied embeddings): 503M
parameters, built with ``from_config`` (no download) and cast to bf16; AdamW on the bf16 weights (pure bf16
training, as the config's ``model.dtype: bfloat16`` gives). Data: random token ids, prompts of 1/8 to 3/8 of
``--seq-len``, prompt + completion between 3/4 and all of it, chosen and rejected of independent lengths.

Timed: ``Trainer.train_step`` (humanline on: a reference synced every step, one reference forward per step),
CUDA-synchronised, after ``--warmup`` steps. Tokens/s counts prompt + response tokens of both sides of every pair.
Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (weights, reference copy, AdamW state,
gradients and activations). With ``--floor`` (default) a plain PyTorch loop on the same padded batches
(policy forward + backward with a full-vocabulary ``log_softmax``, reference forward, reference copy, AdamW) runs
alternating with the trainer, and its own peak is measured in a second pass, so the ratio humanline/floor says
what the trainer's bookkeeping costs on a GPU.

Prints a table and one JSON line (also written to ``$OUT/train_step_gpu.json`` when ``$OUT`` is set). Without
CUDA it says so and exits with code 2 (``--cpu-smoke`` runs a tiny config on the CPU, to test this script).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "src"))

HL_BOUNDS = (-1.0, 1.5)
BETA = 0.1


def llama_config(smoke: bool) -> Any:
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, intermediate_size=128,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                           tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(vocab_size=49152, hidden_size=1024, num_hidden_layers=24, intermediate_size=4096,
                       num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096,
                       tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_examples(n: int, seq_len: int, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """Tokenised DPO examples (docs/DESIGN.md fields); ids avoid the pad/bos/eos ids, completions end in EOS."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        p = r.randint(seq_len // 8, 3 * seq_len // 8)

        def completion(p: int = p) -> list[int]:
            total = r.randint(3 * seq_len // 4, seq_len)
            return [r.randrange(3, vocab) for _ in range(total - p - 1)] + [2]

        out.append({"prompt_ids": [r.randrange(3, vocab) for _ in range(p)], "chosen_ids": completion(),
                    "rejected_ids": completion()})
    return out


def tokens_of(examples: list[dict[str, list[int]]]) -> int:
    return sum(2 * len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)


class Floor:
    """Policy forward + backward (naive full log-softmax), reference forward, reference copy, AdamW step."""

    def __init__(self, model: torch.nn.Module, micro: list[list[dict[str, torch.Tensor]]], lr: float) -> None:
        self.model = model
        self.ref = copy.deepcopy(model).requires_grad_(False).eval()
        self.params, self.ref_params = list(model.parameters()), list(self.ref.parameters())
        self.opt = torch.optim.AdamW(self.params, lr=lr)
        self.micro = micro  # per step: micro-batches, already collated and on the device

    @staticmethod
    def _logps(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits[:, :-1]
        target = b["labels"][:, 1:]
        mask = target != -100
        logp = torch.log_softmax(logits.float(), -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return logp * mask, mask

    def step(self, i: int) -> None:
        batches = self.micro[i % len(self.micro)]
        pairs = sum(b["labels"].shape[0] // 2 for b in batches)
        for b in batches:
            pol, mask = self._logps(self.model, b)
            with torch.no_grad():
                ref, _ = self._logps(self.ref, b)
            s = ((pol - ref).clamp(*HL_BOUNDS) * mask).sum(-1)
            c, r = s.chunk(2)
            (-F.logsigmoid(BETA * (c - r)).sum() / pairs).backward()
        with torch.no_grad():
            torch._foreach_copy_(self.ref_params, self.params)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=8, help="DPO pairs per optimizer step")
    p.add_argument("--micro-batch", type=int, default=None, help="pairs per forward (default: all)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--no-floor", dest="floor", action="store_false")
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny config on the CPU (tests this script)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print("train_step_gpu.py needs a CUDA GPU (none is visible: torch.cuda.is_available() is False). "
              "Run it on a GPU machine, or pass --cpu-smoke to exercise the script on a tiny model here.",
              file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM

    from humanline.config import load_config
    from humanline.data import collate
    from humanline.trainer import DatasetSource, Trainer

    smoke = args.cpu_smoke and not torch.cuda.is_available()
    if smoke:
        torch.set_num_threads(1)  # a tiny model: threads only add contention on a shared CPU
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if smoke else torch.bfloat16

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    config = llama_config(smoke)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn)
    model = model.to(dtype=dtype)
    n_params = sum(q.numel() for q in model.parameters())
    initial = copy.deepcopy(model) if args.floor else None  # the floor starts from the same weights (kept on the CPU)
    model = model.to(dev)

    seq_len = min(args.seq_len, 64) if smoke else args.seq_len
    examples = make_examples(args.pairs * args.batches, seq_len, config.vocab_size, args.seed)
    micro = args.micro_batch or args.pairs
    base = {"model": {"name_or_path": "random-init", "dtype": "float32" if smoke else "bfloat16"},
            "data": {"train": "rows", "max_length": seq_len, "max_prompt_length": seq_len // 2},
            "loss": {"objective": "dpo", "beta": BETA},
            "humanline": {"enabled": True, "log_eps_P": HL_BOUNDS[0], "log_eps_R": HL_BOUNDS[1]},
            "optim": {"lr": args.lr, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
            "train": {"max_steps": 10**9, "batch_size": args.pairs, "micro_batch_size": micro,
                      "output_dir": tempfile.mkdtemp(prefix="hl-gpu-"), "progress": False, "save_final": False}}
    cfg = load_config(None, [], base=base)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2, bos_token_id=1)  # all the trainer reads
    trainer = Trainer(cfg, model, tokenizer, DatasetSource(examples, args.pairs, args.seed))
    steps = [examples[i * args.pairs:(i + 1) * args.pairs] for i in range(args.batches)]
    tokens = [tokens_of(s) for s in steps]

    def hl_step(i: int) -> None:
        trainer.train_step(steps[i % len(steps)])
        trainer.step += 1

    def measure_peak(fn: Any, held_by_others: float) -> float:
        """Peak allocated over 2 steps, less what other contenders hold (constant between their steps)."""
        if dev.type != "cuda":
            return float("nan")
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for r in range(2):
            fn(r)
        sync()
        return torch.cuda.max_memory_allocated() / 2**20 - held_by_others

    contenders: dict[str, Any] = {"humanline": hl_step}
    for r in range(args.warmup):  # warm-up: kernels, allocator, the AdamW state
        hl_step(r)
    peaks = {"humanline": measure_peak(hl_step, 0.0)}
    if args.floor:
        assert initial is not None
        held = torch.cuda.memory_allocated() / 2**20 if dev.type == "cuda" else 0.0
        floor_micro = []
        for s in steps:
            parts = []
            for j in range(0, len(s), micro):
                b = collate(s[j:j + micro], "dpo", pad_token_id=0)
                parts.append({k: v.to(dev) for k, v in b.items() if isinstance(v, torch.Tensor)})
            floor_micro.append(parts)
        floor = Floor(initial.to(dev), floor_micro, args.lr)
        del initial
        for r in range(args.warmup):
            floor.step(r)
        peaks["floor"] = measure_peak(floor.step, held)
        contenders["floor"] = floor.step

    times: dict[str, list[float]] = {k: [] for k in contenders}
    per_token: dict[str, list[float]] = {k: [] for k in contenders}
    for r in range(args.warmup, args.warmup + args.steps):
        for name, fn in contenders.items():  # alternating, step by step
            sync()
            t0 = time.perf_counter()
            fn(r)
            sync()
            dt = time.perf_counter() - t0
            times[name].append(dt)
            per_token[name].append(dt / tokens[r % len(tokens)])

    def med(x: list[float]) -> float:
        return statistics.median(x)

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (smoke test)",
        "torch": torch.__version__, "params": n_params, "dtype": str(dtype), "pairs": args.pairs,
        "micro_batch_pairs": micro, "seq_len": seq_len, "tokens_per_step_mean": sum(tokens) / len(tokens),
        "steps": args.steps, "warmup": args.warmup,
    }
    for name in contenders:
        tps = [1 / x for x in per_token[name]]
        result[name] = {"s_per_step_median": med(times[name]), "s_per_step_min": min(times[name]),
                        "s_per_step_max": max(times[name]), "tokens_per_s": med(tps),
                        "peak_mem_mb": peaks[name]}
    if "floor" in contenders:
        ratios = [a / b for a, b in zip(per_token["humanline"], per_token["floor"])]
        result["humanline_over_floor_time"] = med(ratios)

    print(f"model: {n_params / 1e6:.1f}M params, {dtype}, {result['device']}; {args.pairs} pairs x <= {seq_len} "
          f"tokens ({result['tokens_per_step_mean']:.0f} tokens/step), micro-batch {micro} pairs")
    print("| contender | s/step (median) | min-max s | tokens/s | peak GPU MiB |")
    print("|---|---|---|---|---|")
    for name in contenders:
        m = result[name]
        print(f"| {name} | {m['s_per_step_median']:.3f} | {m['s_per_step_min']:.3f}-{m['s_per_step_max']:.3f} | "
              f"{m['tokens_per_s']:.0f} | {m['peak_mem_mb']:.0f} |")
    if "humanline_over_floor_time" in result:
        print(f"humanline/floor time per token (median of paired steps): {result['humanline_over_floor_time']:.3f}")
    text = json.dumps(result)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "train_step_gpu.json"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
