"""Compare the vLLM and HF rollout backends on one GPU: log-prob agreement, weight sync, tokens/s.

    python benchmarks/gpu/check_vllm.py                       # a tiny Llama built locally (no download)
    python benchmarks/gpu/check_vllm.py --model /path/to/model --dtype bfloat16

Checks, on the same prompts:
1. each backend's behaviour log-probs against a re-scoring HF forward pass (mean / max abs difference);
2. ``update_weights``: after perturbing the policy, vLLM's greedy samples follow the new weights (its
   log-probs match the perturbed model's re-scoring, not the old one's);
3. throughput (generated tokens / s) of each backend.
Prints one JSON object (also written to $OUT/check_vllm.json when $OUT is set). Exit code 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch


def rescore(model, rollouts, device) -> list[float]:
    """|behaviour log-prob - re-scored log-prob| for every completion token."""
    diffs: list[float] = []
    with torch.no_grad():
        for r in rollouts:
            if not r.completion_ids:
                continue
            ids = torch.tensor([r.prompt_ids + r.completion_ids], device=device)
            logits = model(ids).logits[0, len(r.prompt_ids) - 1:-1].float()
            target = ids[0, len(r.prompt_ids):, None]
            lp = torch.log_softmax(logits, -1).gather(1, target).squeeze(1).cpu()
            diffs.extend((lp - torch.tensor(r.logps)).abs().tolist())
    return diffs


def summary(diffs: list[float]) -> dict[str, float]:
    t = torch.tensor(diffs or [float("nan")])
    return {"mean_abs_diff": float(t.mean()), "max_abs_diff": float(t.max()), "tokens": len(diffs)}


def timed(gen, prompts, n, seed) -> tuple[list, dict[str, float]]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    rollouts = gen.generate(prompts, n=n, seed=seed)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(r.completion_ids) for r in rollouts)
    return rollouts, {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local model folder (default: a tiny Llama built here)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max allowed mean |logp diff| (default 1e-3 in float32, 2e-2 otherwise)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_vllm needs a CUDA GPU", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from humanline.rollout import make_generator

    path = args.model
    if path is None:
        from humanline.tiny import save_tiny

        path = save_tiny(os.path.join(tempfile.mkdtemp(), "tiny"), hidden_size=256, num_layers=4)
    dtype = getattr(torch, args.dtype)
    tolerance = args.tolerance or (1e-3 if dtype == torch.float32 else 2e-2)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    prompts = [[{"role": "user", "content": f"Question {i}: what is {i} + {2 * i}? Think step by step."}]
               for i in range(args.prompts)]
    if tok.chat_template is None:
        prompts = [p[0]["content"] for p in prompts]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    report: dict = {"model": path, "dtype": args.dtype, "device": torch.cuda.get_device_name(),
                    "prompts": args.prompts, "n": args.n, **sampling}

    hf = make_generator("hf", model, tok, batch_size=args.prompts * args.n, **sampling)
    hf.generate(prompts[:2], n=1, seed=0)  # warm-up
    hf_rollouts, report["hf"] = timed(hf, prompts, args.n, seed=0)
    report["hf"].update(summary(rescore(model, hf_rollouts, "cuda")))

    vllm_gen = make_generator("vllm", model, tok, gpu_memory_utilization=args.gpu_memory_utilization,
                              dtype=args.dtype, **sampling)
    vllm_gen.generate(prompts[:2], n=1, seed=0)  # warm-up
    vllm_rollouts, report["vllm"] = timed(vllm_gen, prompts, args.n, seed=0)
    report["vllm"].update(summary(rescore(model, vllm_rollouts, "cuda")))
    again = vllm_gen.generate(prompts, n=args.n, seed=0)
    report["vllm"]["seed_reproducible"] = [r.completion_ids for r in again] == [
        r.completion_ids for r in vllm_rollouts]

    # weight sync: perturb the policy, push it, and check vLLM now samples from the perturbed model
    old = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02 * p.float().std().clamp(min=1e-3).to(p.dtype))
    vllm_gen.update_weights(model)
    synced = vllm_gen.generate(prompts[:16], n=1, seed=1)
    report["sync"] = {"new": summary(rescore(model, synced, "cuda"))}
    model.load_state_dict(old)
    report["sync"]["old"] = summary(rescore(model, synced, "cuda"))

    checks = {
        "hf_logps": report["hf"]["mean_abs_diff"] < 1e-4 if dtype == torch.float32 else True,
        "vllm_logps": report["vllm"]["mean_abs_diff"] < tolerance,
        "vllm_seeded": report["vllm"]["seed_reproducible"],
        "weight_sync": report["sync"]["new"]["mean_abs_diff"] < tolerance
        and report["sync"]["new"]["mean_abs_diff"] < report["sync"]["old"]["mean_abs_diff"],
    }
    report["checks"] = checks
    report["speedup_vllm_over_hf"] = report["vllm"]["tokens_per_s"] / report["hf"]["tokens_per_s"]
    text = json.dumps(report, indent=2)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_vllm.json"), "w") as f:
            f.write(text + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
