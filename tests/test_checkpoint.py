"""Checkpoints: atomic writes, exact resume (weights, optimizer, scheduler, RNG, state), pruning."""

from __future__ import annotations

import inspect
import json
import os
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, get_linear_schedule_with_warmup

import humanline.checkpoint as ckpt_module
from humanline.checkpoint import capture_rng, find_checkpoint, load_checkpoint, restore_rng, save_checkpoint
from humanline.errors import HumanlineError
from humanline.models import apply_lora
from humanline.tiny import build_model, build_tokenizer

TOK = build_tokenizer()


def _model(seed: int = 0) -> LlamaForCausalLM:
    return build_model(TOK, hidden_size=32, num_layers=2, num_heads=2, seed=seed)


def _train(model, optimizer, scheduler, steps: int, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        ids = torch.randint(7, len(TOK), (4, 12), generator=gen)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return loss.item()


def _setup(seed: int = 0):
    model = _model(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=20)
    return model, optimizer, scheduler


def _draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand(2).tolist()


def _steps(run_dir) -> list[str]:
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_round_trip_restores_everything(tmp_path) -> None:
    model, optimizer, scheduler = _setup(seed=0)
    _train(model, optimizer, scheduler, steps=3)
    shared = torch.arange(6.0)
    reference = {"w": torch.randn(4, 3), "tied_a": shared, "tied_b": shared}  # shared memory is allowed
    state = {"global_step": 3, "epoch": 0, "data_position": 12, "metrics": {"loss": 1.5}}
    path = save_checkpoint(tmp_path, 3, model=model, tokenizer=TOK, optimizer=optimizer, scheduler=scheduler,
                           trainer_state=state, reference_state=reference)
    assert os.path.basename(path) == "step-00000003"
    expected_draws = _draws()
    expected_loss = _train(model, optimizer, scheduler, steps=2, seed=1)

    model2, optimizer2, scheduler2 = _setup(seed=7)  # different weights: everything must come from disk
    loaded_state, loaded_ref = load_checkpoint(path, model=model2, optimizer=optimizer2, scheduler=scheduler2)
    assert _draws() == expected_draws  # torch, python and numpy RNGs restored
    assert loaded_state == {**state, "step": 3}
    assert loaded_ref is not None and set(loaded_ref) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(loaded_ref[key], value, rtol=0, atol=0)
    assert scheduler2.last_epoch == 3
    assert optimizer2.state_dict()["state"][0]["step"] == 3
    # Two more steps from the restored state reproduce the original run exactly.
    assert _train(model2, optimizer2, scheduler2, steps=2, seed=1) == expected_loss
    for (n, p), (_, p2) in zip(model.named_parameters(), model2.named_parameters()):
        torch.testing.assert_close(p2, p, rtol=0, atol=0, msg=n)
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


def test_files_load_without_pickle(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    _train(model, optimizer, scheduler, steps=1)
    path = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 1})
    names = set(os.listdir(path))
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng-0.safetensors",
            "rng-0.json", "trainer_state.json"} <= names
    assert "reference.safetensors" not in names
    # AdamW and transformers' LambdaLR state dicts hold only tensors and primitives.
    assert torch.load(os.path.join(path, "optimizer.pt"), weights_only=True)["state"][0]["exp_avg"].ndim >= 1
    assert torch.load(os.path.join(path, "scheduler.pt"), weights_only=True)["last_epoch"] == 1
    source = inspect.getsource(ckpt_module)
    assert "weights_only=True" in source and "weights_only=False" not in source
    assert "import pickle" not in source and "torch.load(" in source


def test_keep_last_prunes_oldest(tmp_path) -> None:
    model, optimizer, scheduler = _setup()
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model=model, optimizer=optimizer, scheduler=scheduler,
                        trainer_state={"global_step": step}, keep_last=2)
    assert _steps(tmp_path) == ["step-00000003", "step-00000004"]
    # Saving the same step again replaces it in place.
    save_checkpoint(tmp_path, 4, model=model, trainer_state={"global_step": 4, "again": True}, keep_last=2)
    assert _steps(tmp_path) == ["step-00000003", "step-00000004"]
    with open(os.path.join(tmp_path, "checkpoints", "step-00000004", "trainer_state.json")) as f:
        assert json.load(f)["again"] is True


def test_find_checkpoint_ignores_leftovers(tmp_path) -> None:
    assert find_checkpoint(tmp_path, "auto") is None  # no checkpoints folder yet
    assert find_checkpoint(tmp_path, None) is None
    model = _model()
    good = save_checkpoint(tmp_path, 2, model=model, trainer_state={"global_step": 2})
    ckpt_dir = tmp_path / "checkpoints"
    # What a SIGKILL during a save can leave: a temp folder (and, by hand, a step folder without marker).
    stray = ckpt_dir / "step-00000009.tmp-deadbeef"
    stray.mkdir()
    (stray / "optimizer.pt").write_bytes(b"partial")
    (ckpt_dir / "step-00000010").mkdir()
    assert find_checkpoint(tmp_path, "auto") == good
    with pytest.raises(HumanlineError, match="incomplete"):
        find_checkpoint(tmp_path, str(ckpt_dir / "step-00000010"))
    with pytest.raises(HumanlineError, match="not found"):
        find_checkpoint(tmp_path, str(ckpt_dir / "step-00000099"))
    assert find_checkpoint(tmp_path, good) == good
    with pytest.raises(HumanlineError, match="incomplete"):
        load_checkpoint(ckpt_dir / "step-00000010", model=model)
    save_checkpoint(tmp_path, 3, model=model, trainer_state={"global_step": 3})
    assert not stray.exists()  # the next save cleans temp folders up
    assert find_checkpoint(tmp_path, "auto").endswith("step-00000003")


def test_failed_save_leaves_no_checkpoint(tmp_path) -> None:
    model = _model()
    with pytest.raises(HumanlineError, match="JSON"):
        save_checkpoint(tmp_path, 1, model=model, trainer_state={"bad": object()})
    assert _steps(tmp_path) == []
    assert find_checkpoint(tmp_path, "auto") is None


def test_rng_per_process(tmp_path) -> None:
    rank0 = capture_rng()
    torch.rand(5)
    random.random()
    rank1 = capture_rng()
    expected1 = _draws()
    restore_rng(rank0)
    expected0 = _draws()
    path = save_checkpoint(tmp_path, 1, model=_model(), trainer_state={}, rng_states=[rank0, rank1])
    assert {"rng-0.json", "rng-1.json", "rng-1.safetensors"} <= set(os.listdir(path))
    load_checkpoint(path, model=_model(), process_index=1)
    assert _draws() == expected1
    load_checkpoint(path, model=_model(), process_index=5)  # no file for rank 5: rank 0's states
    assert _draws() == expected0


def test_tied_embeddings_round_trip(tmp_path) -> None:
    config = LlamaConfig(vocab_size=len(TOK), hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = save_checkpoint(tmp_path, 1, model=model, trainer_state={})
    torch.manual_seed(1)
    other = LlamaForCausalLM(config)
    load_checkpoint(path, model=other)  # lm_head.weight is not on disk: it is the embedding
    torch.testing.assert_close(other.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert other.lm_head.weight.data_ptr() == other.model.embed_tokens.weight.data_ptr()


def test_mismatched_weights_are_one_line_error(tmp_path) -> None:
    path = save_checkpoint(tmp_path, 1, model=_model(), trainer_state={})
    bigger = build_model(TOK, hidden_size=32, num_layers=3, num_heads=2)
    with pytest.raises(HumanlineError, match="do not fit"):
        load_checkpoint(path, model=bigger)


def test_lora_round_trip(tmp_path) -> None:
    model = apply_lora(_model(seed=0), r=2, alpha=4, dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=10)
    _train(model, optimizer, scheduler, steps=2)
    path = save_checkpoint(tmp_path, 2, model=model, tokenizer=TOK, optimizer=optimizer, scheduler=scheduler,
                           trainer_state={"global_step": 2})
    assert os.path.exists(os.path.join(path, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(path, "model.safetensors"))

    fresh = apply_lora(_model(seed=0), r=2, alpha=4, dropout=0.0)
    optimizer2 = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    scheduler2 = get_linear_schedule_with_warmup(optimizer2, num_warmup_steps=0, num_training_steps=10)
    load_checkpoint(path, model=fresh, optimizer=optimizer2, scheduler=scheduler2)
    for (n, p), (_, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        torch.testing.assert_close(p2, p, rtol=0, atol=0, msg=n)
    with pytest.raises(HumanlineError, match="LoRA adapter but the model has none"):
        load_checkpoint(path, model=_model())


def test_sharded_weights_load(tmp_path) -> None:
    model = _model(seed=0)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")  # how a large model lands on disk
    assert (folder / "model.safetensors.index.json").exists()
    (folder / "trainer_state.json").write_text("{}")
    other = _model(seed=3)
    load_checkpoint(folder, model=other, restore_rng_state=False)
    for (n, p), (_, p2) in zip(model.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(p2, p, rtol=0, atol=0, msg=n)
