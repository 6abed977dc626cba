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


def load_policy_tokenizer(cfg: Config) -> Any:
    """The policy's tokenizer (``model.tokenizer``, else the model's own)."""
    m = cfg.model
    return load_tokenizer(m.tokenizer or m.name_or_path, gguf_file=m.gguf_file if not m.tokenizer else None,
                          trust_remote_code=m.trust_remote_code, revision=m.revision)


def load_policy(cfg: Config, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """The policy model (with a LoRA adapter when configured) and its tokenizer (loaded unless given)."""
    m = cfg.model
    if tokenizer is None:
        tokenizer = load_policy_tokenizer(cfg)
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
    eval_ex: list[dict] = []
    if source is None and not _is_generated(cfg):
        # A fixed data set is checked in full before the weights load: a bad row fails in seconds, not after
        # loading a large model, and before anything is written.
        if tokenizer is None:
            tokenizer = load_policy_tokenizer(cfg)
        train_ex, eval_ex, counts = prepare_offline(cfg, tokenizer, train_dataset, eval_dataset)
        _check_one_batch(cfg, len(train_ex), train_dataset if train_dataset is not None else cfg.data.train)
        if counts["truncated_rows"]:
            print(f"humanline: truncated {counts['truncated_rows']} of {counts['rows']} rows to "
                  f"data.max_prompt_length={cfg.data.max_prompt_length} / data.max_length={cfg.data.max_length}")
        source = DatasetSource(train_ex, cfg.train.batch_size, cfg.train.seed)
    if model is None:
        model, tokenizer = load_policy(cfg, tokenizer)
    if source is None:
        from .rollout.schedule import build_rollout_source

        source, evaluators = build_rollout_source(cfg, model, tokenizer, prompts=train_dataset,
                                                  eval_prompts=eval_dataset, rewards=rewards,
                                                  evaluators=evaluators)
    trainer = Trainer(cfg, model, tokenizer, source, eval_examples=eval_ex, evaluators=evaluators)
    return trainer.train()


def _check_one_batch(cfg: Config, n: int, source: Source) -> None:
    if n < cfg.train.batch_size:
        raise HumanlineError(f"{source_label(source)}: {n} examples, fewer than one batch "
                             f"(key 'train.batch_size' = {cfg.train.batch_size})")


def _is_generated(cfg: Config) -> bool:
    return cfg.rollout.generate_every > 0 or cfg.rollout.offline_source == "initial_policy"


def validate(cfg: Config) -> str:
    """Check the config and the data without loading the model weights; returns a one-line summary."""
    if _is_generated(cfg):
        from .rollout.schedule import load_prompt_rows

        rows = load_prompt_rows(cfg, cfg.data.train, cfg.data.train_split)
        return f"ok: {len(rows)} prompts for {cfg.loss.objective} with generated samples"
    tokenizer = load_policy_tokenizer(cfg)
    train_ex, eval_ex, counts = prepare_offline(cfg, tokenizer)
    _check_one_batch(cfg, len(train_ex), cfg.data.train)
    return (f"ok: {counts['rows']} {cfg.loss.objective} examples ({counts['truncated_rows']} truncated), "
            f"{counts['eval_rows']} eval examples")
