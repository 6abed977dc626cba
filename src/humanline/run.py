"""From a config to a trained model: load the policy, prepare the data or the rollouts, run the trainer.

These are the functions behind the CLI, usable from Python too::

    from humanline import load_config, train
    result = train(load_config("recipes/dpo-humanline.yaml", ["optim.lr=5e-7"]))
"""

from __future__ import annotations

from typing import Any

import datasets
from torch import nn

from .config import Config
from .data import load_rows, source_label, to_objective_rows, tokenize_dataset
from .errors import HumanlineError
from .models import apply_lora, load_model, load_tokenizer
from .trainer import DatasetSource, StepSource, Trainer, TrainResult

Source = str | datasets.Dataset | list[dict[str, Any]]


def load_policy(cfg: Config) -> tuple[nn.Module, Any]:
    """The policy model (with a LoRA adapter when configured) and its tokenizer."""
    m = cfg.model
    tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, gguf_file=m.gguf_file if not m.tokenizer else None,
                               trust_remote_code=m.trust_remote_code, revision=m.revision)
    model = load_model(m.name_or_path, gguf_file=m.gguf_file, dtype=m.dtype,
                       attn_implementation=m.attn_implementation, gradient_checkpointing=m.gradient_checkpointing,
                       trust_remote_code=m.trust_remote_code, revision=m.revision)
    if cfg.lora.enabled:
        model = apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                           target_modules=cfg.lora.target_modules)
    return model, tokenizer


def load_objective_rows(cfg: Config, source: Source, split: str) -> datasets.Dataset:
    """Load, convert to the objective's TRL format, and validate (one-line errors)."""
    rows = load_rows(source, split=split, name=cfg.data.subset)
    return to_objective_rows(rows, cfg.loss.objective, columns=cfg.data.columns, source=source_label(source))


def prepare_offline(cfg: Config, tokenizer: Any, train_dataset: Source | None = None,
                    eval_dataset: Source | None = None) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Tokenised train and eval examples of a fixed data set, and counts (rows, truncated rows)."""
    train_rows = load_objective_rows(cfg, train_dataset if train_dataset is not None else cfg.data.train,
                                     cfg.data.train_split)
    eval_rows = None
    if eval_dataset is not None or cfg.data.eval:
        eval_rows = load_objective_rows(cfg, eval_dataset if eval_dataset is not None else cfg.data.eval,
                                        cfg.data.eval_split)
    elif cfg.data.eval_size:
        size = cfg.data.eval_size
        split = train_rows.train_test_split(test_size=int(size) if size >= 1 else size, seed=cfg.train.seed,
                                            shuffle=True)
        train_rows, eval_rows = split["train"], split["test"]
    d = cfg.data
    train_ex, stats = tokenize_dataset(train_rows, tokenizer, cfg.loss.objective,
                                       max_prompt_length=d.max_prompt_length, max_length=d.max_length,
                                       source=source_label(train_dataset if train_dataset is not None
                                                           else cfg.data.train))
    eval_ex: list[dict] = []
    if eval_rows is not None:
        eval_ex, _ = tokenize_dataset(eval_rows, tokenizer, cfg.loss.objective,
                                      max_prompt_length=d.max_prompt_length, max_length=d.max_length)
    counts = {"rows": stats.rows, "truncated_rows": stats.truncated_rows, "eval_rows": len(eval_ex)}
    return train_ex, eval_ex, counts


def train(cfg: Config, *, model: nn.Module | None = None, tokenizer: Any = None,
          train_dataset: Source | None = None, eval_dataset: Source | None = None,
          source: StepSource | None = None, rewards: list | None = None,
          evaluators: list | None = None) -> TrainResult:
    """Train from a config. Pass ``model``/``tokenizer``/data sets to skip loading them from the config."""
    if (model is None) != (tokenizer is None):
        raise HumanlineError("pass both model and tokenizer, or neither")
    if model is None:
        model, tokenizer = load_policy(cfg)
    eval_ex: list[dict] = []
    if source is None:
        if _is_generated(cfg):
            from .rollout.schedule import build_rollout_source

            source, evaluators = build_rollout_source(cfg, model, tokenizer, prompts=train_dataset,
                                                      eval_prompts=eval_dataset, rewards=rewards,
                                                      evaluators=evaluators)
        else:
            train_ex, eval_ex, counts = prepare_offline(cfg, tokenizer, train_dataset, eval_dataset)
            if counts["truncated_rows"]:
                print(f"humanline: truncated {counts['truncated_rows']} of {counts['rows']} rows to "
                      f"data.max_prompt_length={cfg.data.max_prompt_length} / data.max_length={cfg.data.max_length}")
            source = DatasetSource(train_ex, cfg.train.batch_size, cfg.train.seed)
    trainer = Trainer(cfg, model, tokenizer, source, eval_examples=eval_ex, evaluators=evaluators)
    return trainer.train()


def _is_generated(cfg: Config) -> bool:
    return cfg.rollout.generate_every > 0 or cfg.rollout.offline_source == "initial_policy"


def validate(cfg: Config) -> str:
    """Check the config and the data without loading the model weights; returns a one-line summary."""
    if _is_generated(cfg):
        from .rollout.schedule import load_prompt_rows

        rows = load_prompt_rows(cfg, cfg.data.train, cfg.data.train_split)
        return f"ok: {len(rows)} prompts for {cfg.loss.objective} with generated samples"
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path,
                               gguf_file=cfg.model.gguf_file if not cfg.model.tokenizer else None,
                               trust_remote_code=cfg.model.trust_remote_code, revision=cfg.model.revision)
    train_ex, eval_ex, counts = prepare_offline(cfg, tokenizer)
    if len(train_ex) < cfg.train.batch_size:
        raise HumanlineError(f"{cfg.data.train}: {len(train_ex)} examples, fewer than one batch "
                             f"(train.batch_size={cfg.train.batch_size})")
    return (f"ok: {counts['rows']} {cfg.loss.objective} examples ({counts['truncated_rows']} truncated), "
            f"{counts['eval_rows']} eval examples")
