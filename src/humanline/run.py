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
from .precompute import attach_reference_logps, should_precompute
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
    train_ex: list[dict] | None = None
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
    identity = ""  # for the precomputed reference's cache key; a model passed in is known by its weights only
    if model is None:
        model, tokenizer = load_policy(cfg, tokenizer)
        m = cfg.model
        identity = f"{m.name_or_path}|{m.gguf_file}|{m.revision}|{m.dtype}"
    if train_ex is not None:
        if should_precompute(cfg):
            # The policy is still the initial model, i.e. the frozen reference: its log-probs, once (or cached).
            train_ex, eval_ex = attach_reference_logps(cfg, model, tokenizer, train_ex, eval_ex, identity=identity)
        source = DatasetSource(train_ex, cfg.train.batch_size, cfg.train.seed)
        if cfg.eval.generate:
            evaluators = [*(evaluators or []), _offline_generation_evaluator(cfg, model, tokenizer, rewards,
                                                                             train_dataset, eval_dataset)]
    if source is None:
        from .rollout.schedule import build_rollout_source

        source, evaluators = build_rollout_source(cfg, model, tokenizer, prompts=train_dataset,
                                                  eval_prompts=eval_dataset, rewards=rewards,
                                                  evaluators=evaluators)
    trainer = Trainer(cfg, model, tokenizer, source, eval_examples=eval_ex, evaluators=evaluators)
    return trainer.train()


def _offline_generation_evaluator(cfg: Config, model: nn.Module, tokenizer: Any, rewards: Any,
                                  train_dataset: Source | None, eval_dataset: Source | None) -> Any:
    """``eval.generate`` on a fixed data set: generate for its eval prompts (``data.eval``, else the training
    prompts) and score them with the run's rewards; the initial policy (``model``, before training) is the
    win-rate baseline (re-read from the run folder when resuming)."""
    from .evaluation import build_generation_evaluator
    from .rollout.schedule import build_reward_set, load_prompt_rows

    if eval_dataset is not None or cfg.data.eval:
        rows = load_prompt_rows(cfg, eval_dataset if eval_dataset is not None else cfg.data.eval, cfg.data.eval_split)
    else:
        rows = load_prompt_rows(cfg, train_dataset if train_dataset is not None else cfg.data.train,
                                cfg.data.train_split)
    _, evaluator = build_generation_evaluator(cfg, tokenizer, build_reward_set(cfg, rewards), train_rows=rows,
                                              eval_prompts=rows)
    if not (cfg.train.resume_from and evaluator.baseline_path.exists()):
        evaluator.compute_baseline(model)
    return evaluator


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


# --- sampling, labelling and evaluating outside training (the CLI's sample / label / eval) -------------------


def sample(cfg: Config, output: str) -> str:
    """Sample ``rollout.num_generations`` completions of every prompt of ``data.train`` from the policy
    (``rollout.*`` sampling settings, seed ``train.seed``) and write JSONL rows ``{prompt, completion,
    prompt_id, <the prompt's other columns>}`` atomically to ``output``; returns the path. ``prompt_id`` is the
    prompt's row (unless the data set has its own); chat prompts get ``[{"role": "assistant", ...}]``
    completions. Blank completions are written as sampled (`label` leaves them out)."""
    from .evaluation import device_for_eval
    from .feedback import save_jsonl
    from .rollout.schedule import build_generator, fitting_prompts, load_prompt_rows, prompt_table

    prompts, columns = prompt_table(load_prompt_rows(cfg, cfg.data.train, cfg.data.train_split))
    tokenizer = load_policy_tokenizer(cfg)
    keep, _ = fitting_prompts(tokenizer, prompts, cfg.data.max_prompt_length)
    model, tokenizer = load_policy(cfg, tokenizer)
    model = model.to(device_for_eval())
    generator = build_generator(cfg, model, tokenizer)
    rollouts = generator.generate([prompts[i] for i in keep], n=cfg.rollout.num_generations, seed=cfg.train.seed)
    rows = []
    for r in rollouts:
        index = keep[r.group]
        row: dict[str, Any] = {"prompt": r.prompt,
                               "completion": r.completion if isinstance(r.prompt, str)
                               else [{"role": "assistant", "content": r.completion}]}
        if "prompt_id" not in columns:
            row["prompt_id"] = index
        for name, values in columns.items():
            if name not in row:
                row[name] = values[index]
        rows.append(row)
    return save_jsonl(rows, output)


def label(cfg: Config, input: str, output: str, fmt: str = "pairs") -> str:
    """Score the samples in ``input`` (JSONL ``{prompt, completion, ...}``, e.g. from `sample`) with the config's
    rewards and write training rows in TRL's format to ``output``: ``pairs`` (DPO: ``rollout.pair_rule`` /
    ``pair_threshold``), ``binary`` (KTO: ``rollout.binary_rule`` / ``binary_threshold``) or ``groups`` (GRPO).
    Samples are grouped by ``prompt_id`` when the file has one, else by identical prompt; every other column is
    passed to the rewards. Blank completions are left out (the data loader rejects them), with a note."""
    import json

    from .data.validation import RowProblem, check_prompt, group_key, iter_rows, located, resolve_columns
    from .feedback import save_jsonl
    from .rollout import Rollout
    from .rollout.schedule import build_reward_set, completion_text, note, rows_from_rollouts

    formats = {"pairs": "dpo", "binary": "kto", "groups": "grpo"}
    if fmt not in formats:
        raise HumanlineError(f"unknown format '{fmt}': use one of {', '.join(formats)}")
    rows = load_rows(input)
    label_ = source_label(input)
    cols = resolve_columns(cfg.data.columns, source=label_)
    pcol, ccol = cols["prompt"], cols["completion"]
    for col in (pcol, ccol):
        if col not in rows.column_names:
            raise HumanlineError(f"{label_}: missing column '{col}': label needs prompt and completion columns "
                                 "(the output of `humanline sample`)")
    hidden = ("__line__", "__row__")
    extra = [n for n in rows.column_names if n not in (pcol, ccol, *hidden)]
    data = rows.select_columns(extra).to_dict() if extra else {}
    groups: dict[Any, int] = {}
    rollouts: list[Rollout] = []
    kept: list[int] = []
    blank = 0
    for index, line, row, values in iter_rows(rows, [pcol, ccol, cols["prompt_id"]]):
        for col in (pcol, ccol):
            try:
                value = check_prompt(values.get(col)) if col == pcol else completion_text(values.get(col))
            except RowProblem as problem:
                raise located(problem.message, source=label_, row=row, line=line,
                              field=col + (problem.field or "")) from None
            if col == pcol:
                prompt = value
            else:
                text = value
        if not text.strip():
            blank += 1
            continue
        if isinstance(prompt, list):
            prompt = [{k: v for k, v in m.items() if v is not None} for m in prompt]
        key = group_key(prompt, values.get(cols["prompt_id"]))
        group = groups.setdefault(key, len(groups))
        rollouts.append(Rollout(prompt=prompt, prompt_ids=[], completion_ids=[], completion=text, logps=[],
                                group=group, finished=True))
        kept.append(index)
    if blank:
        note(f"left out {blank} blank completions of {len(rows)}")
    if not rollouts:
        raise HumanlineError(f"{label_}: no non-blank completion to label")
    reward_set = build_reward_set(cfg)
    columns = {k: [data[k][i] for i in kept] for k in extra}
    result = reward_set([r.prompt for r in rollouts], [r.completion for r in rollouts], **columns)
    if fmt == "groups":  # a group needs two samples
        sizes: dict[int, int] = {}
        for r in rollouts:
            sizes[r.group] = sizes.get(r.group, 0) + 1
        pick = [i for i, r in enumerate(rollouts) if sizes[r.group] >= 2]
        rollouts = [rollouts[i] for i in pick]
        scores = [result.scores[i] for i in pick]
        kept = [kept[i] for i in pick]
    else:
        scores = result.scores
    out, stats = rows_from_rollouts(formats[fmt], rollouts, scores, cfg, seed=cfg.train.seed, keep_ids=False)
    if not out:
        raise HumanlineError(f"{label_}: no {fmt} rows from {len(rollouts)} samples ({stats}): the scores never "
                             "separate the samples of a prompt; check the rewards or rollout.pair_threshold / "
                             "binary_rule")
    # The prompt's other columns (e.g. answer), from the first sample of its group, where the row has no such key.
    first = {}
    for r, i in zip(rollouts, kept):
        first.setdefault(json.dumps(r.prompt, sort_keys=True), i)
    for row in out:
        i = first.get(json.dumps(row["prompt"], sort_keys=True))
        if i is None:
            continue
        for k in extra:
            if k not in row and k != "prompt_id":
                row[k] = data[k][i]
    note(f"{len(out)} {fmt} rows from {len(rollouts)} samples; mean reward "
          f"{sum(result.scores) / len(result.scores):.4g}")
    return save_jsonl(out, output)


def evaluate_checkpoint(cfg: Config, checkpoint: str) -> dict[str, float]:
    """Generation-based evaluation of a saved model (a run's ``final`` folder, a checkpoint, or an adapter) on
    ``data.eval`` (else ``data.train``) prompts with the config's rewards and ``eval.*`` settings; the win rate is
    against the config's model (``model.name_or_path``, the initial policy). Returns the metrics."""
    import os

    from .evaluation import GenerationEvaluator, device_for_eval
    from .models import load_trained
    from .rollout.schedule import build_reward_set, load_prompt_rows, note

    if not os.path.isdir(checkpoint):
        raise HumanlineError(f"checkpoint not found: {checkpoint}")
    source = cfg.data.eval or cfg.data.train
    rows = load_prompt_rows(cfg, source, cfg.data.eval_split if cfg.data.eval else cfg.data.train_split)
    has_tokenizer = os.path.exists(os.path.join(checkpoint, "tokenizer_config.json"))
    tokenizer = load_tokenizer(checkpoint) if has_tokenizer else load_policy_tokenizer(cfg)
    e = cfg.eval
    evaluator = GenerationEvaluator(
        rows, build_reward_set(cfg), tokenizer, max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
        temperature=e.temperature, num_prompts=e.num_prompts, batch_size=cfg.rollout.generation_batch_size,
        top_p=cfg.rollout.top_p if e.temperature > 0 else 1.0, seed=cfg.train.seed,
        max_prompt_length=cfg.data.max_prompt_length)
    if os.path.abspath(checkpoint) != os.path.abspath(cfg.model.name_or_path):
        try:
            initial, _ = load_policy(cfg, tokenizer)
        except HumanlineError as err:  # the win rate is a bonus: evaluate without it
            note(f"no eval/win_rate: the initial policy did not load ({err})")
        else:
            evaluator.compute_baseline(initial.to(device_for_eval()))
            del initial
    model = load_trained(checkpoint, dtype=cfg.model.dtype).to(device_for_eval())
    metrics = evaluator(model, 0)
    metrics["eval/num_prompts"] = float(len(evaluator.prompts))
    return metrics
