"""Precomputed reference log-probs (reference.precompute): equal to the live reference's, the same training run,
no reference copy, a cache reused by the next run, and one-line refusals where they cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import tiny_rows

import humanline.precompute as precompute
import humanline.trainer as trainer_module
from humanline.config import load_config
from humanline.data import collate
from humanline.errors import ConfigError, HumanlineError
from humanline.precompute import cache_path, fingerprint, precompute_reference_logps
from humanline.reference import Reference
from humanline.run import prepare_offline, train
from humanline.tiny import build_model, build_tokenizer
from humanline.trainer import DatasetSource, Trainer

# grpo uses its reference only through the KL term
EXTRA = {"dpo": [], "grpo": ["loss.kl_beta=0.1"]}


def config(tmp_path: Path, objective: str, *overrides: str):
    base = {"model": {"name_or_path": "tiny"}, "data": {"train": "rows", "max_length": 48, "max_prompt_length": 16},
            "loss": {"objective": objective}, "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 4, "output_dir": str(tmp_path / "run"),
                      "progress": False, "save_final": False}}
    return load_config(None, [*EXTRA.get(objective, []), *overrides], base=base)


def tiny_model(tok):
    return build_model(tok, hidden_size=32, num_layers=2, seed=0)


def examples(tmp_path: Path, objective: str, *overrides: str):
    cfg = config(tmp_path, objective, *overrides)
    tok = build_tokenizer()
    train_ex, _, _ = prepare_offline(cfg, tok, tiny_rows(objective, 12))
    return cfg, tok, train_ex


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_precomputed_equal_the_live_reference(tmp_path: Path, objective: str) -> None:
    cfg, tok, train_ex = examples(tmp_path, objective)
    model = tiny_model(tok)
    ex = precompute_reference_logps(model, train_ex, objective, pad_token_id=tok.pad_token_id, batch_size=3,
                                    cache_dir=None)
    keys = ["ref_chosen_logps", "ref_rejected_logps"] if objective == "dpo" else ["ref_logps"]
    side = ["chosen_ids", "rejected_ids"] if objective == "dpo" else ["completion_ids"]
    assert all(len(e[k]) == len(e[s]) for e in ex for k, s in zip(keys, side))
    batch = collate(ex[:5], objective, pad_token_id=tok.pad_token_id)
    live = Reference(model).logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert batch["ref_logps"].shape == live.shape  # [N, T-1], chosen rows then rejected rows for DPO
    assert (batch["ref_logps"] - live).abs().max() < 1e-5
    assert (batch["ref_logps"][batch["labels"][:, 1:] == -100] == 0).all()

    # The trainer slices and trims them like its live reference forward, and builds no reference model.
    on = Trainer(config(tmp_path, objective, "reference.precompute=true"), model, tok, DatasetSource(ex, 8, 0))
    off = Trainer(cfg, tiny_model(tok), tok, DatasetSource(train_ex, 8, 0))
    assert on.reference is None and off.reference is not None
    b = len(ex[:5])
    for rows in (None, slice(0, b), slice(b, None)) if objective == "dpo" else (None, slice(1, 3)):
        _, _, ref = on._forward(on.model, batch, rows)
        _, _, ref_live = off._forward(off.model, batch, rows)
        assert ref.shape == ref_live.shape and (ref - ref_live).abs().max() < 1e-5


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_training_with_precompute_matches_the_live_reference(tmp_path: Path, objective: str, monkeypatch) -> None:
    tok = build_tokenizer()
    rows = tiny_rows(objective, 16)
    results = []
    for precomputed in (False, True):
        cfg = config(tmp_path / str(precomputed), objective, f"reference.precompute={str(precomputed).lower()}",
                     "data.eval_size=4")
        if precomputed:  # not even built: the point is the memory of a second model copy
            monkeypatch.setattr(trainer_module, "Reference", None)
        result = train(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=rows)
        results.append(result)
    params = [r.model.state_dict() for r in results]
    assert max(float((params[0][k] - params[1][k]).abs().max()) for k in params[0]) < 1e-5
    live, pre = results[0].history[-1], results[1].history[-1]
    assert abs(live["eval/loss"] - pre["eval/loss"]) < 1e-5
    assert len(list((tmp_path / "True" / "run" / "cache").glob("ref-logps-*.safetensors"))) == 2  # train, eval


def test_cache_is_reused_and_keyed_by_model_and_data(tmp_path: Path, monkeypatch) -> None:
    cfg, tok, train_ex = examples(tmp_path, "dpo")
    model = tiny_model(tok)

    def fp(m, ex, **kw):
        return fingerprint(m, ex, "dpo", **{"max_prompt_length": 16, "max_length": 48, **kw})

    key = fp(model, train_ex)
    first = precompute_reference_logps(model, train_ex, "dpo", pad_token_id=tok.pad_token_id, batch_size=4,
                                       cache_dir=tmp_path / "cache", fingerprint=key)
    assert cache_path(tmp_path / "cache", key).is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"ref-logps-{key}.safetensors"]  # no temp file

    def boom(*args, **kwargs):
        raise AssertionError("the model ran although the cache holds its values")

    monkeypatch.setattr(model, "forward", boom)
    second = precompute_reference_logps(model, train_ex, "dpo", pad_token_id=tok.pad_token_id, batch_size=4,
                                        cache_dir=tmp_path / "cache", fingerprint=key)
    for a, b in zip(first, second):
        assert torch.equal(a["ref_chosen_logps"], b["ref_chosen_logps"])
        assert torch.equal(a["ref_rejected_logps"], b["ref_rejected_logps"])
    # Another model, other tokens, other limits or another name: another key.
    other = build_model(tok, hidden_size=32, num_layers=2, seed=1)
    changed = [{**train_ex[0], "chosen_ids": train_ex[0]["chosen_ids"][:-1]}, *train_ex[1:]]
    assert len({key, fp(other, train_ex), fp(model, changed), fp(model, train_ex, max_length=64),
                fp(model, train_ex, identity="org/model|None|main|bfloat16")}) == 5


def test_second_run_loads_the_cache(tmp_path: Path, monkeypatch) -> None:
    tok = build_tokenizer()
    cfg = config(tmp_path, "dpo", "reference.precompute=true")
    train(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=tiny_rows("dpo", 16))

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although the cache holds the values")

    monkeypatch.setattr(precompute, "_compute", boom)
    train(cfg, model=tiny_model(tok), tokenizer=tok, train_dataset=tiny_rows("dpo", 16))
    assert len(list((tmp_path / "run" / "cache").iterdir())) == 1


@pytest.mark.parametrize("overrides, words", [
    (["loss.objective=kto"], ["KTO", "KL rows"]),
    (["humanline.enabled=true"], ["frozen", "syncing"]),
    (["reference.mode=sync"], ["frozen", "syncing"]),
])
def test_refused_combinations(tmp_path: Path, overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        config(tmp_path, "dpo", "reference.precompute=true", *overrides)
    assert info.value.key == "reference.precompute" and "\n" not in str(info.value)
    assert all(w in str(info.value) for w in words)


def test_trainer_without_precomputed_values_says_so(tmp_path: Path) -> None:
    cfg, tok, train_ex = examples(tmp_path, "dpo", "reference.precompute=true")
    trainer = Trainer(cfg, tiny_model(tok), tok, DatasetSource(train_ex, 8, 0))  # examples lack ref_*_logps
    with pytest.raises(HumanlineError, match="no precomputed reference log-probs") as info:
        trainer.train_step(trainer.source.examples_for_step(0))
    assert "\n" not in str(info.value)
