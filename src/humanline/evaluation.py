"""Generation-based evaluation: sample answers to held-out prompts and score them with the run's rewards.

`GenerationEvaluator` is a trainer evaluator: ``evaluator(model, step) -> metrics`` (merged into the step's
logged metrics, like the loss-based ``eval/...`` ones). Metrics:

``eval/reward``
    mean total (weighted) reward of the completions; ``eval/rewards/<name>/mean`` per reward (unweighted).
``eval/accuracy``
    for a verifier reward (one whose values are 0 or 1): the fraction of prompts whose value of that reward is
    >= 1, i.e. its mean. Which reward: ``accuracy`` = a reward name, True (the first reward), None (default:
    the first reward that is a built-in verifier, ``exact_match`` or ``math_verify``, or that has an
    ``is_verifier = True`` attribute; no accuracy if there is none) or False (never).
``eval/win_rate``
    against the initial policy's completions of the same prompts, scored once at the start: per prompt 1 if
    the current total reward is higher, 0.5 on a tie, 0 if lower; the mean over prompts.
``eval/mean_length``
    mean completion length in tokens (EOS included); ``eval/clipped_ratio``: the fraction cut at
    ``max_new_tokens``.

Decoding is greedy by default (``temperature=0``); with a temperature, sampling is seeded, so an evaluation is
repeatable. Every process of a multi-process run evaluates the same prompts (the trainer calls evaluators on
all of them); only the main process writes the baseline file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from humanline.config import Config
from humanline.errors import HumanlineError
from humanline.rewards import RewardSet
from humanline.rollout.hf import HFGenerator
from humanline.rollout.schedule import fitting_prompts, load_prompt_rows, note, prompt_table

VERIFIERS = ("exact_match", "math_verify")


@dataclass
class EvalSamples:
    """Completions of the evaluation prompts and their scores."""

    completions: list[str]
    scores: list[float]
    per_reward: dict[str, list[float]]
    lengths: list[int]
    finished: list[bool]


class GenerationEvaluator:
    """Generate on held-out prompts and score with ``reward_set`` (see the module docstring for the metrics).

    ``prompts_rows``: rows with a ``prompt`` (text or chat messages) and any extra columns the rewards need
    (`humanline.rollout.schedule.load_prompt_rows` output, or a list of dicts); the first ``num_prompts`` that
    fit ``max_prompt_length`` are used. ``baseline_policy``: the model whose completions ``eval/win_rate`` is
    measured against (scored at the first call unless `compute_baseline` ran before); ``baseline_path``: a
    JSONL file the baseline is saved to, and read from when the evaluator has none (a resumed run).
    """

    def __init__(self, prompts_rows: Any, reward_set: RewardSet | Sequence[Any], tokenizer: Any, *,
                 max_new_tokens: int, temperature: float = 0.0, num_prompts: int = 64,
                 baseline_policy: Any = None, accuracy: bool | str | None = None, batch_size: int = 64,
                 top_p: float = 1.0, seed: int = 0, max_prompt_length: int | None = None,
                 baseline_path: str | os.PathLike | None = None) -> None:
        if num_prompts < 1:
            raise HumanlineError(f"num_prompts must be at least 1, got {num_prompts}")
        self.reward_set = reward_set if isinstance(reward_set, RewardSet) else RewardSet(list(reward_set))
        self.tokenizer = tokenizer
        prompts, columns = prompt_table(prompts_rows)
        if not prompts:
            raise HumanlineError("generation-based evaluation needs at least one prompt")
        keep = list(range(len(prompts)))
        if max_prompt_length is not None:
            keep, _ = fitting_prompts(tokenizer, prompts, max_prompt_length, what="evaluation prompts")
        keep = keep[:num_prompts]
        self.prompts = [prompts[i] for i in keep]
        self.columns = {k: [v[i] for i in keep] for k, v in columns.items()}
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size, self.seed = batch_size, seed
        self.accuracy_reward = self._accuracy_reward(accuracy)
        self.baseline_policy = baseline_policy
        self.baseline_path = Path(baseline_path) if baseline_path is not None else None
        self.baseline: EvalSamples | None = None

    def _accuracy_reward(self, accuracy: bool | str | None) -> str | None:
        names = self.reward_set.names
        if accuracy is False:
            return None
        if accuracy is True:
            return names[0]
        if isinstance(accuracy, str):
            if accuracy not in names:
                raise HumanlineError(f"accuracy: no reward named '{accuracy}' (rewards: {', '.join(names)})")
            return accuracy
        for name, fn in zip(names, self.reward_set.fns):
            if name in VERIFIERS or getattr(fn, "is_verifier", False):
                return name
        return None

    # --- generation ------------------------------------------------------------------------------------------
    def generate(self, model: Any) -> EvalSamples:
        """Completions of the evaluation prompts by ``model`` (one per prompt), scored."""
        generator = HFGenerator(model, self.tokenizer, max_new_tokens=self.max_new_tokens,
                                temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size)
        rollouts = generator.generate(self.prompts, n=1, seed=self.seed)
        completions = [r.completion for r in rollouts]
        result = self.reward_set(self.prompts, completions, **self.columns)
        return EvalSamples(completions=completions, scores=result.scores, per_reward=result.per_reward,
                           lengths=[r.num_tokens for r in rollouts], finished=[r.finished for r in rollouts])

    def compute_baseline(self, model: Any) -> None:
        """Score ``model`` (the initial policy) as the win-rate baseline, and save it to ``baseline_path``."""
        self.baseline = self.generate(model)
        if self.baseline_path is not None and _is_main_process():
            from humanline.feedback import save_jsonl

            rows = [{"prompt": p, "completion": c, "score": s}
                    for p, c, s in zip(self.prompts, self.baseline.completions, self.baseline.scores)]
            save_jsonl(rows, self.baseline_path)

    def _load_baseline(self) -> None:
        path = self.baseline_path
        if path is None or not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if len(rows) != len(self.prompts) or any(r.get("prompt") != p for r, p in zip(rows, self.prompts)):
            note(f"{path} holds other prompts than this evaluation: no eval/win_rate")
            return
        scores = [float(r["score"]) for r in rows]
        self.baseline = EvalSamples(completions=[r["completion"] for r in rows], scores=scores, per_reward={},
                                    lengths=[], finished=[])

    # --- metrics ---------------------------------------------------------------------------------------------
    def metrics(self, samples: EvalSamples) -> dict[str, float]:
        n = len(samples.scores)
        out = {"eval/reward": sum(samples.scores) / n,
               "eval/mean_length": sum(samples.lengths) / n,
               "eval/clipped_ratio": sum(not f for f in samples.finished) / n}
        for name, values in samples.per_reward.items():
            out[f"eval/rewards/{name}/mean"] = sum(values) / n
        if self.accuracy_reward is not None:
            out["eval/accuracy"] = sum(v >= 1.0 for v in samples.per_reward[self.accuracy_reward]) / n
        if self.baseline is not None:
            wins = [1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(samples.scores, self.baseline.scores)]
            out["eval/win_rate"] = sum(wins) / n
        return out

    def __call__(self, model: Any, step: int = 0) -> dict[str, float]:
        if self.baseline is None and self.baseline_policy is not None:
            self.compute_baseline(self.baseline_policy)
            self.baseline_policy = None  # scored once; let it go
        if self.baseline is None:
            self._load_baseline()
        return self.metrics(self.generate(model))


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState

        return PartialState().is_main_process
    except Exception:  # noqa: BLE001
        return True


def split_eval_prompts(cfg: Config, train_rows: datasets.Dataset, eval_prompts: Any = None
                       ) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(training prompts, evaluation prompts): ``eval_prompts`` if given, else ``data.eval``, else a held-out
    slice of the training prompts: ``data.eval_size`` (a fraction, or a count when >= 1) when set, else
    ``min(eval.num_prompts, 10%)`` of them (seeded); with fewer than 10 prompts nothing can be held out and the
    training prompts are evaluated (a note is printed)."""
    if eval_prompts is not None:
        return train_rows, load_prompt_rows(cfg, eval_prompts, cfg.data.eval_split)
    if cfg.data.eval:
        return train_rows, load_prompt_rows(cfg, cfg.data.eval, cfg.data.eval_split)
    size = cfg.data.eval_size
    n = len(train_rows)
    count = (int(size) if size >= 1 else round(size * n)) if size else min(cfg.eval.num_prompts, n // 10)
    if count < 1 or count >= n:
        note("eval.generate has no held-out prompts (no data.eval, and too few prompts to hold "
              "some out): evaluating on training prompts")
        return train_rows, train_rows
    split = train_rows.train_test_split(test_size=count, seed=cfg.train.seed, shuffle=True)
    note(f"eval.generate holds out {count} of {n} prompts for evaluation (set data.eval to choose)")
    return split["train"], split["test"]


def build_generation_evaluator(cfg: Config, tokenizer: Any, reward_set: RewardSet, *,
                               train_rows: datasets.Dataset, eval_prompts: Any = None,
                               baseline_policy: Any = None) -> tuple[datasets.Dataset, GenerationEvaluator]:
    """The config's `GenerationEvaluator` (``eval.*``; the baseline saved under ``train.output_dir/eval/``) and
    the training prompts left once a held-out slice is taken (see `split_eval_prompts`)."""
    train_rows, eval_rows = split_eval_prompts(cfg, train_rows, eval_prompts)
    e = cfg.eval
    evaluator = GenerationEvaluator(
        eval_rows, reward_set, tokenizer, max_new_tokens=e.max_new_tokens or cfg.rollout.max_new_tokens,
        temperature=e.temperature, num_prompts=e.num_prompts, batch_size=cfg.rollout.generation_batch_size,
        top_p=cfg.rollout.top_p if e.temperature > 0 else 1.0, seed=cfg.train.seed,
        max_prompt_length=cfg.data.max_prompt_length, baseline_policy=baseline_policy,
        baseline_path=Path(cfg.train.output_dir) / "eval" / "baseline.jsonl")
    return train_rows, evaluator


def device_for_eval() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
