"""FSDP (FSDP2) on CPU: two gloo processes (torchrun; humanline.sharding.make_accelerator turns accelerate's DDP
into FSDP on a machine without GPUs) train exactly as one process does, the sharded reference holds the policy's
pre-update weights, and checkpoints, resuming and the final model work.

DeepSpeed is refused by the trainer (docs/DESIGN.md says why); only the refusal is tested.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from humanline.errors import HumanlineError

TESTS = Path(__file__).parent
SCRIPT = TESTS / "scripts" / "fsdp_runs.py"
FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
            "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "OMP_NUM_THREADS": "1"}


def _runs_module():
    spec = importlib.util.spec_from_file_location("fsdp_runs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    """Humanline DPO (sync every 1 and 2), KTO, GRPO: 2 FSDP processes x GA 2 vs 1 process x GA 4, 3-4 steps."""
    out = tmp_path / "fsdp"
    env = {**os.environ, "PYTHONPATH": str(TESTS), **FSDP_ENV}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(SCRIPT), str(out)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    checks = json.loads((out / "checks.json").read_text())
    runs = _runs_module()

    for name, record in checks.items():
        # Really FSDP, with a reference sharded like the policy (matching shards, not a full copy).
        assert record["distributed_type"] == "FSDP" and record["num_processes"] == 2, name
        assert record["policy"].startswith("FSDP") and record["reference"].startswith("FSDP"), record
        numel = record["numel"]
        assert numel["reference_local"] == numel["policy_local"] < numel["full"], (name, numel)
        # After every step the reference holds exactly the start-of-step weights of its last sync step.
        for s in record["steps"]:
            assert s["max_diff"] in (0.0, None), (name, s)
        k = 2 if name == "dpo_sync2" else 1  # synced during step s when (s + 1) % k == 0; 0: the initial weights
        expected = [max(0, s["step"] - (s["step"] + 1) % k) for s in record["steps"]]
        assert [s["holds"] for s in record["steps"]] == expected, name

    # The same runs in this one process (GA 4) end at the same parameters.
    for name, (objective, overrides) in runs.RUNS.items():
        trainer = runs.build(tmp_path / "one" / name, objective, overrides)
        assert trainer.acc.num_processes == 1
        trainer.train()
        one = {k: v.detach() for k, v in trainer.unwrapped.state_dict().items()}
        two = load_file(str(out / name / "params.safetensors"))
        assert _max_diff(one, two) < 1e-5, name
        assert _max_diff(one, trainer.reference.model.state_dict()) > 1e-4  # the policy moved on from its reference

    # Resumed from the step-2 checkpoint (policy, optimizer, synced reference), the run ends where it would have.
    straight = load_file(str(out / "dpo_sync1" / "params.safetensors"))
    assert _max_diff(load_file(str(out / "dpo_resumed" / "params.safetensors")), straight) < 1e-6
    assert checks["dpo_resumed"]["steps"][0]["step"] == 2
    # A sharded run's checkpoint holds full states in the plain layout: one process resumes it too.
    objective, overrides = runs.RUNS["dpo_sync1"]
    ckpt = out / "dpo_sync1" / "checkpoints" / "step-00000002"
    trainer = runs.build(tmp_path / "one" / "resumed", objective,
                         [*overrides, "train.save_every=0", "train.save_final=false", f"train.resume_from={ckpt}"])
    trainer.train()
    assert trainer.history[0]["step"] == 3
    assert _max_diff({k: v.detach() for k, v in trainer.unwrapped.state_dict().items()}, straight) < 1e-5
    # The final model is a plain save_pretrained folder.
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(str(out / "dpo_sync1" / "final"))
    assert type(final).__name__ == "LlamaForCausalLM"
    assert _max_diff(final.state_dict(), straight) == 0.0
    # eval under FSDP (dpo_sync2 evaluates at step 2 and at the end)
    assert sum("eval/loss" in h for h in checks["dpo_sync2"]["history"]) == 2


def test_deepspeed_is_refused(tmp_path: Path) -> None:
    """DeepSpeed would step inside every backward (no place for the humanline sync): a clear error instead."""
    runs = _runs_module()
    trainer = runs.build(tmp_path / "run", "dpo", ["humanline.enabled=true"])
    fake = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(HumanlineError, match="DeepSpeed is not supported"):
        type(trainer)(trainer.cfg, trainer.unwrapped, trainer.tokenizer, trainer.source, accelerator=fake)
