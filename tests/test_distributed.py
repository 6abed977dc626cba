"""FSDP (FSDP2) and DeepSpeed ZeRO-3 on CPU: two gloo processes (torchrun; humanline.sharding.make_accelerator
turns accelerate's DDP into FSDP or DeepSpeed on a machine without GPUs) train exactly as one process does, the
sharded (partitioned) reference holds the policy's pre-update weights, and checkpoints, resuming and the final
model work. DeepSpeed is not a test dependency: its test is skipped unless it is installed
(``pip install deepspeed``).
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
DEEPSPEED_ENV = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "DS_ACCELERATOR": "cpu",
                 "OMP_NUM_THREADS": "1"}


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


def _two_processes(out: Path, env: dict[str, str], names: list[str]) -> dict:
    """Run tests/scripts/fsdp_runs.py (the named runs, or all) in 2 gloo processes; its checks.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(SCRIPT), str(out), *names]
    proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(TESTS), **env}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return json.loads((out / "checks.json").read_text())


def _check_sharded_runs(checks: dict, distributed_type: str, wrapper: str) -> None:
    for name, record in checks.items():
        # Really sharded, with a reference sharded like the policy (matching shards, not a full copy).
        assert record["distributed_type"] == distributed_type and record["num_processes"] == 2, name
        assert record["policy"].startswith(wrapper) and record["reference"].startswith(wrapper), record
        numel = record["numel"]
        assert numel["reference_local"] == numel["policy_local"] < numel["full"], (name, numel)
        # After every step the reference holds exactly the start-of-step weights of its last sync step.
        for s in record["steps"]:
            assert s["max_diff"] in (0.0, None), (name, s)
        k = 2 if name == "dpo_sync2" else 1  # synced during step s when (s + 1) % k == 0; 0: the initial weights
        expected = [max(0, s["step"] - (s["step"] + 1) % k) for s in record["steps"]]
        assert [s["holds"] for s in record["steps"]] == expected, name


def _check_matches_one(tmp_path: Path, out: Path, names: list[str]) -> dict[str, float]:
    """The same runs in this one process (GA 4) end at the same parameters; the largest differences."""
    runs = _runs_module()
    diffs = {}
    for name in names:
        objective, overrides = {**runs.RUNS, **runs.MORE_RUNS}[name]
        trainer = runs.build(tmp_path / "one" / name, objective, overrides)
        assert trainer.acc.num_processes == 1
        trainer.train()
        one = {k: v.detach() for k, v in trainer.unwrapped.state_dict().items()}
        diffs[name] = _max_diff(one, load_file(str(out / name / "params.safetensors")))
        assert diffs[name] < 1e-5, (name, diffs[name])
        assert _max_diff(one, trainer.reference.model.state_dict()) > 1e-4  # the policy moved on from its reference
    return diffs


def _check_resumed(out: Path, checks: dict) -> dict[str, torch.Tensor]:
    """Resumed from the step-2 checkpoint (policy, optimizer, synced reference), the run ends where it would have."""
    straight = load_file(str(out / "dpo_sync1" / "params.safetensors"))
    assert _max_diff(load_file(str(out / "dpo_resumed" / "params.safetensors")), straight) < 1e-6
    assert checks["dpo_resumed"]["steps"][0]["step"] == 2
    return straight


def _check_final_model(out: Path, straight: dict[str, torch.Tensor]) -> None:
    """The final model is a plain save_pretrained folder."""
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(str(out / "dpo_sync1" / "final"))
    assert type(final).__name__ == "LlamaForCausalLM"
    assert _max_diff(final.state_dict(), straight) == 0.0


def test_fsdp_two_processes_match_one(tmp_path: Path) -> None:
    """Humanline DPO (sync every 1 and 2), KTO, GRPO: 2 FSDP processes x GA 2 vs 1 process x GA 4, 3-4 steps."""
    out = tmp_path / "fsdp"
    checks = _two_processes(out, FSDP_ENV, [])
    runs = _runs_module()
    _check_sharded_runs(checks, "FSDP", "FSDP")
    _check_matches_one(tmp_path, out, list(runs.RUNS))
    straight = _check_resumed(out, checks)
    # A sharded run's checkpoint holds full states in the plain layout: one process resumes it too.
    objective, overrides = runs.RUNS["dpo_sync1"]
    ckpt = out / "dpo_sync1" / "checkpoints" / "step-00000002"
    trainer = runs.build(tmp_path / "one" / "resumed", objective,
                         [*overrides, "train.save_every=0", "train.save_final=false", f"train.resume_from={ckpt}"])
    trainer.train()
    assert trainer.history[0]["step"] == 3
    assert _max_diff({k: v.detach() for k, v in trainer.unwrapped.state_dict().items()}, straight) < 1e-5
    _check_final_model(out, straight)
    # eval under FSDP (dpo_sync2 evaluates at step 2 and at the end)
    assert sum("eval/loss" in h for h in checks["dpo_sync2"]["history"]) == 2


DEEPSPEED_RUNS = ["dpo_sync1", "dpo_sync2", "kto", "dpo_clip"]


def test_deepspeed_zero3_two_processes_match_one(tmp_path: Path) -> None:
    """Humanline DPO (sync every 1 and 2, clipping on and off) and KTO: 2 ZeRO-3 processes x GA 2 vs 1 process x
    GA 4; the reference is a second ZeRO-3 engine whose partitions equal the policy's pre-update ones; DeepSpeed's
    own checkpoint format resumes exactly; the final model is a plain save_pretrained folder."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    checks = _two_processes(out, DEEPSPEED_ENV, [*DEEPSPEED_RUNS, "dpo_resumed"])
    _check_sharded_runs(checks, "DEEPSPEED", "DeepSpeedEngine")
    diffs = _check_matches_one(tmp_path, out, DEEPSPEED_RUNS)
    print("max |2 processes - 1 process|:", diffs)
    # DeepSpeed's partitioned states (one optimizer file per process) inside the trainer's atomic checkpoint.
    ckpt = out / "dpo_sync1" / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in (ckpt / "deepspeed" / "state").glob("*optim_states.pt")) == [
        f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)]
    assert not (ckpt / "optimizer.pt").exists() and (ckpt / "reference.safetensors").exists()
    assert not list((out / "dpo_sync1" / "checkpoints").glob("deepspeed-staging-*"))
    _check_final_model(out, _check_resumed(out, checks))
    # the pre-clipping gradient norm is the one-process one; eval under ZeRO-3 (at step 2 and at the end)
    assert [h["grad_norm"] for h in checks["dpo_clip"]["history"]][0] > 0.1
    assert sum("eval/loss" in h for h in checks["dpo_sync2"]["history"]) == 2


def test_deepspeed_other_zero_stages_are_refused(tmp_path: Path) -> None:
    """Only ZeRO-3 is supported (and tested): stages 0-2 get a clear error (no DeepSpeed needed to check)."""
    runs = _runs_module()
    trainer = runs.build(tmp_path / "run", "dpo", ["humanline.enabled=true"])
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": 2}})
    fake = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))
    with pytest.raises(HumanlineError, match="ZeRO stage 2 is not supported"):
        type(trainer)(trainer.cfg, trainer.unwrapped, trainer.tokenizer, trainer.source, accelerator=fake)
