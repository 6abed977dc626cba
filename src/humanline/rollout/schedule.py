"""Generated training data: online (fresh samples every step), semi-online (every N steps) and offline from the
initial policy, behind the trainer's `StepSource` interface.

``rollout.generate_every`` is the one knob:

* ``1`` (online): every step samples ``prompts_per_step`` prompts x ``num_generations`` completions from the
  current policy, scores them, and trains on the rows built from them (GRPO groups, DPO pairs, KTO labels).
* ``N > 1`` (semi-online): every N steps one *round* samples N steps' worth of prompts (``N x prompts_per_step``
  prompts x ``num_generations``) from the current policy, scores them once, builds the rows and splits them into
  N per-step chunks in a seeded order. Samples per step are those of online training; generation happens N
  times less often. (With N >= 1 a step trains on the rows its samples give: ``prompts_per_step x
  num_generations`` GRPO rows, up to ``prompts_per_step`` best-worst DPO pairs...; ``train.batch_size`` is not
  used.) GRPO rows keep the behaviour log-probs (``old_logps``), so the ratio of normal GRPO is taken
  against the policy that sampled, however many steps ago. A round always samples N steps' worth, even where
  ``train.max_steps`` ends the run inside it, so a round never depends on ``max_steps`` (a run resumed with a
  larger one continues exactly).
* ``0`` with ``offline_source: initial_policy``: one round at the start samples ``num_generations`` completions
  for *every* prompt from the initial policy; the rows are then used like a fixed data set: ``train.batch_size``
  rows per step (all rows if fewer), in seeded epochs.

Prompts are drawn in seeded epochs over the prompt set (round ``k`` takes the next ``steps x prompts_per_step``
positions), and round ``k`` samples with a seed derived from ``(train.seed, k)``: a run is reproducible.

Every round is written atomically to ``run_dir/rollouts/round-{k:05d}.jsonl`` (rows in TRL's formats: pairs
``{prompt, chosen, rejected, score_chosen, score_rejected}``, binary ``{prompt, completion, label, score}`` or
groups ``{prompt, completion, score, prompt_id, advantage}``, plus the sampled token ids, and for groups the
behaviour log-probs ``logps``), with ``round-{k:05d}.json`` beside it (the round's step count and metrics).
``humanline.data.prepare`` / ``data.train`` read these files as offline data. ``old_logps`` in a groups row is
the behaviour log-probs when the completion text re-encodes to exactly the sampled ids (a finished completion),
else null: the data loader appends EOS to a completion, so the log-probs of a completion cut at
``max_new_tokens`` would not line up. (Blank completions, where the model stopped at once, are kept as they
were trained on; the data loader rejects blank completions, so drop such rows before reusing a file offline.)

Resuming: `state_dict` records the last round generated; after `load_state_dict`, the steps of that round are
served from its file (ids, labels, advantages and log-probs as trained), not regenerated from weights that
have moved on. Later rounds are generated as usual.

Empty steps. A DPO round can give no pair (every sample of a prompt ties), a KTO round no label. The trainer
needs at least one example per process per step, so a round that has fewer rows than ``steps x processes``
draws ``prompts_per_step`` more prompts (seeded) and samples again, up to ``MAX_EXTRA_DRAWS`` times (logged as
``rollout/extra_draws``); if rows are still short, rows are repeated to fill every step (``rollout/repeated_rows``);
a round with no row at all after every draw stops the run with a `HumanlineError` (the reward never separates
the samples: check the reward, ``pair_threshold`` or the sampling temperature).

Several processes. Every process samples the same prompts with the same seed (the simplest correct choice: FSDP
and DeepSpeed ZeRO-3 need every process inside the forward passes of ``generate``; with DDP the work is
duplicated). The main process alone scores the samples and builds the rows, which are then broadcast, so
every process trains on the same example list (each takes its slice) even where sampling on two devices
differs in the last bit, and a reward with side effects (an API call) runs once. Only the main process writes
files; a resumed run reads them on every process, so ``train.output_dir`` must be shared (as for checkpoints).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets

from humanline.config import Config
from humanline.data import encode_completion, encode_prompts, load_rows, source_label
from humanline.data.collate import batches
from humanline.data.tokenize import truncate_prompt
from humanline.data.validation import (
    LINE_COLUMN,
    ROW_COLUMN,
    RowProblem,
    check_messages,
    check_prompt,
    iter_rows,
    located,
    resolve_columns,
)
from humanline.errors import DataError, HumanlineError
from humanline.feedback import save_jsonl, to_binary, to_groups, to_pairs
from humanline.rewards import RewardModelScorer, RewardSet, load_reward
from humanline.rollout import Generator, Rollout, make_generator

MAX_EXTRA_DRAWS = 8
ROLLOUTS_DIR = "rollouts"
_HIDDEN = (LINE_COLUMN, ROW_COLUMN)

Source = str | os.PathLike | datasets.Dataset | Sequence[Mapping[str, Any]]


def note(message: str) -> None:
    """A one-line notice on stderr (stdout stays clean for the CLI's output, e.g. `humanline eval`'s JSON)."""
    print(f"humanline: {message}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- prompts


def load_prompt_rows(cfg: Config, source: Source, split: str) -> datasets.Dataset:
    """Prompts for generation: a ``datasets.Dataset`` with a ``prompt`` column (text or chat messages) and every
    other column of ``source`` (e.g. ``answer``), which rewards receive as keyword arguments.

    ``source``: a file, a hub name, a list of rows or a Dataset. The prompt column is ``prompt`` (renamed by
    ``data.columns``, e.g. ``{prompt: question}``); a data set with only a ``messages`` column (conversations)
    gives its messages up to the last assistant turn. Any problem is a one-line `DataError`.
    """
    label = source_label(source)
    rows = load_rows(source, split=split, name=cfg.data.subset)
    cols = resolve_columns(cfg.data.columns, source=label)
    names = list(rows.column_names)
    prompt_col, messages_col = cols["prompt"], cols["messages"]
    from_messages = prompt_col not in names and messages_col in names
    if prompt_col not in names and not from_messages:
        present = ", ".join(n for n in names if n not in _HIDDEN) or "none"
        hint = "" if prompt_col != "prompt" else "; rename yours with data.columns: {prompt: <your column>}"
        raise DataError(f"missing column: generating samples needs a '{prompt_col}' column of prompts (text or "
                        f"chat messages) (found: {present}){hint}", source=label, field=prompt_col)
    field = messages_col if from_messages else prompt_col
    prompts: list[Any] = []
    for _, line, row, values in iter_rows(rows, [field]):
        try:
            value = values.get(field)
            if from_messages:
                value = _prompt_of_conversation(check_messages(value, "messages"))
            prompts.append(check_prompt(value))
        except RowProblem as problem:
            raise located(problem.message, source=label, row=row, line=line,
                          field=field + (problem.field or "")) from None
    # Every other column rides along for the rewards (a column literally named 'prompt' that is not the prompt
    # column is dropped: the prompt takes its name).
    extra = [n for n in names if n not in (*_HIDDEN, field, "prompt")]
    table = {"prompt": [_clean_prompt(p) for p in prompts]}
    if extra:
        table.update(rows.select_columns(extra).to_dict())
    try:
        return datasets.Dataset.from_dict(table)
    except Exception as err:  # noqa: BLE001 - mixed prompt kinds (text and messages) in one column
        raise DataError(f"cannot build the prompt table ({type(err).__name__}): prompts must all be text or "
                        "all chat messages", source=label, field=field) from None


def _prompt_of_conversation(messages: list[dict]) -> list[dict]:
    """A conversation's prompt: its messages before the final assistant turn (all of them if none)."""
    if messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages:
        raise RowProblem("messages holds only an assistant turn: no prompt to generate from")
    return messages


def _clean_prompt(prompt: Any) -> Any:
    """Messages without the keys Arrow fills with None (so a prompt re-read from JSON is the same)."""
    if isinstance(prompt, str):
        return prompt
    return [{k: v for k, v in m.items() if v is not None} for m in prompt]


def completion_text(value: Any) -> str:
    """The text of a completion: a string, or one assistant message (a dict, or a list holding one)."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], Mapping) \
            and isinstance(value[0].get("content"), str):
        return value[0]["content"]
    raise RowProblem(f"completion must be a string or one assistant message, got {type(value).__name__}")


def prompt_table(rows: datasets.Dataset | Sequence[Mapping[str, Any]]) -> tuple[list[Any], dict[str, list[Any]]]:
    """(prompts, {extra column: values}) of `load_prompt_rows` output, as plain python lists."""
    if isinstance(rows, datasets.Dataset):
        data = rows.to_dict()
    else:
        keys: dict[str, None] = {}
        for r in rows:
            keys.update(dict.fromkeys(r))
        data = {k: [r.get(k) for r in rows] for k in keys}
    prompts = [_clean_prompt(p) for p in data.pop("prompt")]
    return prompts, {k: list(v) for k, v in data.items() if k not in _HIDDEN}


def fitting_prompts(tokenizer: Any, prompts: Sequence[Any], max_prompt_length: int, *, what: str = "prompts"
                    ) -> tuple[list[int], list[list[int]]]:
    """Indices (and ids) of the prompts that encode to at most ``max_prompt_length`` tokens. Longer prompts are
    left out with a printed note: generating from a prompt the trainer would cut would make the sampled
    completion (and its log-probs) condition on a context the trainer never sees."""
    encoded = encode_prompts(tokenizer, list(prompts))
    keep = [i for i, ids in enumerate(encoded) if len(ids) <= max_prompt_length]
    if not keep:
        raise HumanlineError(f"every one of the {len(prompts)} {what} is longer than data.max_prompt_length="
                             f"{max_prompt_length} tokens: raise data.max_prompt_length")
    if len(keep) < len(prompts):
        note(f"left out {len(prompts) - len(keep)} of {len(prompts)} {what} longer than "
              f"data.max_prompt_length={max_prompt_length} tokens")
    return keep, [encoded[i] for i in keep]


# ----------------------------------------------------------------------------------------------- helpers


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from any parts, the same in every process and Python run (unlike ``hash``)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _process_info() -> tuple[int, bool]:
    """(number of processes, is this the main process), from accelerate's state when it is initialised."""
    try:
        from accelerate import PartialState

        state = PartialState()
        return state.num_processes, state.is_main_process
    except Exception:  # noqa: BLE001 - no accelerate state: one process
        return 1, True


def _broadcast(obj: Any, num_processes: int) -> Any:
    if num_processes == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    box = [obj]
    broadcast_object_list(box, from_process=0)
    return box[0]


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def build_reward_set(cfg: Config, rewards: Any = None) -> RewardSet:
    """The rewards of a run: ``rewards`` when given (a `RewardSet`, or a list of callables, import-path strings or
    ``(reward, weight)`` pairs), else ``rollout.rewards`` (built-in names or import paths, weighted) plus
    ``rollout.reward_model`` (a sequence-classification model) weighted by ``rollout.reward_model_weight``."""
    if isinstance(rewards, RewardSet):
        return rewards
    fns: list[Any] = []
    weights: list[float] = []
    if rewards is not None:
        items = [rewards] if callable(rewards) else list(rewards)
        for item in items:
            fn, weight = item if isinstance(item, tuple) else (item, 1.0)
            if not (callable(fn) or isinstance(fn, str)):
                raise HumanlineError(f"rewards: expected a callable, an import path or (reward, weight), got "
                                     f"{type(fn).__name__}")
            fns.append(fn)
            weights.append(float(weight))
    else:
        for spec in cfg.rollout.rewards:
            fns.append(load_reward(spec.name))
            weights.append(spec.weight)
        if cfg.rollout.reward_model:
            fns.append(RewardModelScorer(cfg.rollout.reward_model))
            weights.append(cfg.rollout.reward_model_weight)
    if not fns:
        raise HumanlineError("no reward: set rollout.rewards or rollout.reward_model (or pass rewards=[...])")
    return RewardSet(fns, weights=weights)


def rows_from_rollouts(objective: str, rollouts: Sequence[Rollout], scores: Sequence[float], cfg: Config, *,
                       seed: int = 0, keep_ids: bool = True) -> tuple[list[dict], dict[str, float]]:
    """Rows of ``objective`` from scored rollouts (feedback.py with the config's pair / binary rules), and the
    builder's statistics as metrics."""
    r = cfg.rollout
    if objective == "dpo":
        rows, stats = to_pairs(rollouts, scores, rule=r.pair_rule, threshold=r.pair_threshold, seed=seed,
                               keep_ids=keep_ids)
        return rows, {"pairs/kept": float(stats["pairs"]), "pairs/prompts_skipped": float(stats["prompts_skipped"])}
    if objective == "kto":
        threshold = r.binary_threshold
        if r.binary_rule in ("median", "mean"):
            threshold = None  # these rules compute their own centre
        rows, stats = to_binary(rollouts, scores, rule=r.binary_rule, threshold=threshold, keep_ids=keep_ids)
        return rows, {"binary/desirable": float(stats["desirable"]),
                      "binary/undesirable": float(stats["undesirable"])}
    if objective == "grpo":
        rows, stats = to_groups(rollouts, scores, keep_ids=keep_ids)
        return rows, {"frac_reward_zero_std": float(stats["frac_reward_zero_std"])}
    raise HumanlineError(f"objective '{objective}' does not train on generated samples (use dpo, kto or grpo)")


# ----------------------------------------------------------------------------------------------- the source


@dataclasses.dataclass
class _Round:
    index: int
    steps: int  # optimizer steps served by this round (0: initial-policy data, served in epochs)
    rows: list[dict]
    examples: list[dict]
    chunks: list[list[int]]  # per step: indices into examples
    metrics: dict[str, float]


class RolloutSource:
    """A `StepSource` that samples from the policy (see the module docstring for the schedule).

    ``policy`` returns the current (unwrapped) policy; the generator is refreshed with it
    (``update_weights``) before each round. ``prompt_rows``: `load_prompt_rows` output (or rows with a
    ``prompt`` key). ``run_dir``: where ``rollouts/`` goes (None: nothing is written and resuming regenerates).
    ``on_start``: callables ``hook(policy)`` run once, before the first round of a fresh (not resumed) run,
    e.g. the evaluator's baseline.
    """

    def __init__(self, cfg: Config, generator: Generator, tokenizer: Any, prompt_rows: Any, reward_set: RewardSet,
                 *, policy: Callable[[], Any], run_dir: str | os.PathLike | None = None,
                 on_start: Sequence[Callable[[Any], None]] = ()) -> None:
        r = cfg.rollout
        if r.generate_every < 0 or (r.generate_every == 0 and r.offline_source != "initial_policy"):
            raise HumanlineError("a rollout source needs rollout.generate_every >= 1 (online / semi-online) or "
                                 "rollout.offline_source: initial_policy")
        if cfg.loss.objective not in ("dpo", "kto", "grpo"):
            raise HumanlineError(f"loss.objective '{cfg.loss.objective}' trains on a fixed data set, not on "
                                 "generated samples (use dpo, kto or grpo)")
        self.cfg, self.generator, self.tokenizer, self.reward_set = cfg, generator, tokenizer, reward_set
        self.policy = policy if callable(policy) and not hasattr(policy, "parameters") else (lambda: policy)
        self.objective = cfg.loss.objective
        self.every = r.generate_every
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.on_start = list(on_start)
        prompts, columns = prompt_table(prompt_rows)
        keep, _ = fitting_prompts(tokenizer, prompts, cfg.data.max_prompt_length)
        self.prompts = [prompts[i] for i in keep]
        self.columns = {k: [v[i] for i in keep] for k, v in columns.items()}
        self._round: _Round | None = None
        self._resumed_round: int | None = None  # rounds <= this one are read from their files
        self._last_round: int | None = None
        self._started = False
        self._epochs: dict[int, list[int]] = {}
        self.rounds_generated = 0  # rounds sampled by this process (not re-read from files)
        self.last_generation_time = 0.0
        self.last_metrics: dict[str, float] = {}

    # --- StepSource ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"round": self._last_round, "started": self._started}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("round") is not None:
            self._resumed_round = int(state["round"])
            self._last_round = self._resumed_round
        if state.get("started") or state.get("round") is not None:
            self._started = True  # resumed: the start hooks (baseline) ran in the first run

    def examples_for_step(self, step: int) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        fresh = False
        if not self._started:
            for hook in self.on_start:
                hook(self.policy())
            self._started = True
        index, position = self._position(step)
        if self._round is None or self._round.index != index:
            self._round = None
            if self._resumed_round is not None and index <= self._resumed_round:
                self._round = self._read_round(index)
            if self._round is None:
                self._round = self._generate_round(index)
                fresh = True
            self._last_round = index
        rnd = self._round
        if rnd.steps:
            chunk = rnd.chunks[position]
            lag = position
        else:  # initial-policy data: batch_size rows per step, in seeded epochs
            size = min(self.cfg.train.batch_size, len(rnd.examples))
            per_epoch = len(rnd.examples) // size
            epoch, i = divmod(position, per_epoch)
            chunk = batches(len(rnd.examples), size, seed=self.cfg.train.seed, epoch=epoch)[i]
            lag = step
        examples = [rnd.examples[i] for i in chunk]
        metrics = {k: v for k, v in rnd.metrics.items() if fresh or not k.startswith("generation/")}
        metrics.update({"rollout/rows": float(len(examples)), "rollout/round": float(index),
                        "rollout/policy_lag": float(lag), "rollout/fresh": float(fresh)})
        self.last_metrics = metrics
        self.last_generation_time = time.perf_counter() - t0
        return examples

    # --- rounds --------------------------------------------------------------------------------------------
    def _position(self, step: int) -> tuple[int, int]:
        if self.every == 0:
            return 0, step
        return step // self.every, step % self.every

    def _steps_in_round(self, index: int) -> int:
        # Always N steps' worth, even where train.max_steps ends the run inside the round: a round never depends
        # on max_steps, so a run resumed with a larger max_steps continues exactly.
        return self.every

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = list(range(len(self.prompts)))
            random.Random(derive_seed(self.cfg.train.seed, "prompts", epoch)).shuffle(order)
            self._epochs = {epoch: order}  # positions only move forward: keep one epoch
        return self._epochs[epoch]

    def _prompt_indices(self, index: int, steps: int) -> list[int]:
        """Round ``index``'s prompts: the next ``steps x prompts_per_step`` positions of the seeded epochs."""
        if self.every == 0:
            return list(range(len(self.prompts)))
        per_round = self.every * self.cfg.rollout.prompts_per_step
        start = index * per_round
        n = len(self.prompts)
        out = []
        for p in range(start, start + steps * self.cfg.rollout.prompts_per_step):
            epoch, i = divmod(p, n)
            out.append(self._epoch_order(epoch)[i])
        return out

    def _extra_indices(self, index: int, attempt: int) -> list[int]:
        rng = random.Random(derive_seed(self.cfg.train.seed, "extra", index, attempt))
        k = self.cfg.rollout.prompts_per_step
        n = len(self.prompts)
        return rng.sample(range(n), k) if k <= n else [rng.randrange(n) for _ in range(k)]

    def _sample(self, indices: list[int], seed: int, group_offset: int) -> tuple[list[Rollout], float]:
        t0 = time.perf_counter()
        rollouts = self.generator.generate([self.prompts[i] for i in indices], n=self.cfg.rollout.num_generations,
                                           seed=seed)
        seconds = time.perf_counter() - t0
        return [dataclasses.replace(r, group=r.group + group_offset) for r in rollouts], seconds

    def _generate_round(self, index: int) -> _Round:
        steps = self._steps_in_round(index)
        num_processes, is_main = _process_info()
        need = max(1, steps) * num_processes
        self.generator.update_weights(self.policy())
        indices = self._prompt_indices(index, steps)
        g = self.cfg.rollout.num_generations
        rollouts, gen_seconds = self._sample(indices, derive_seed(self.cfg.train.seed, "round", index, 0), 0)
        sample_prompts = [i for i in indices for _ in range(g)]
        payload: Any = None
        extra_draws = 0
        while True:
            if is_main:
                try:
                    rows, metrics = self._score(index, rollouts, sample_prompts)
                except HumanlineError as err:
                    payload = ("error", err)
                else:
                    payload = ("ok", rows, metrics)
            # Every process learns whether more prompts are needed (they all sample in step).
            payload = _broadcast(payload, num_processes)
            if payload[0] == "error":
                raise payload[1]
            rows = payload[1]
            if len(rows) >= need or extra_draws >= MAX_EXTRA_DRAWS:
                break
            extra_draws += 1
            more = self._extra_indices(index, extra_draws)
            new, seconds = self._sample(more, derive_seed(self.cfg.train.seed, "round", index, extra_draws),
                                        len(sample_prompts) // g)
            rollouts += new
            gen_seconds += seconds
            sample_prompts += [i for i in more for _ in range(g)]
        _, rows, metrics = payload
        if not rows:
            why = {"dpo": f"no pair has a score gap above rollout.pair_threshold={self.cfg.rollout.pair_threshold}",
                   "kto": f"rollout.binary_rule={self.cfg.rollout.binary_rule!r} labelled no sample"}
            raise HumanlineError(
                f"rollout round {index}: no {self.objective} rows from {len(sample_prompts) // g} prompts x {g} "
                f"samples ({why.get(self.objective, 'nothing to train on')}); check the rewards, the pair / binary "
                "rule or rollout.temperature")
        tokens = sum(r.num_tokens for r in rollouts)
        metrics["rollout/extra_draws"] = float(extra_draws)
        metrics["generation/tokens_per_second"] = tokens / max(gen_seconds, 1e-9)
        metrics["generation/seconds"] = gen_seconds
        self.rounds_generated += 1
        if is_main and self.run_dir is not None:
            self._write_round(index, steps, rows, metrics)
        return self._make_round(index, steps, rows, metrics, num_processes)

    def _score(self, index: int, rollouts: list[Rollout], sample_prompts: list[int]
               ) -> tuple[list[dict], dict[str, float]]:
        prompts = [self.prompts[i] for i in sample_prompts]
        columns = {k: [v[i] for i in sample_prompts] for k, v in self.columns.items()}
        result = self.reward_set(prompts, [r.completion for r in rollouts], **columns)
        rows, stats = rows_from_rollouts(self.objective, rollouts, result.scores, self.cfg,
                                         seed=derive_seed(self.cfg.train.seed, "pairs", index))
        if self.objective == "grpo":
            for row, rollout in zip(rows, rollouts):  # to_groups keeps every rollout, in order
                logps = row.pop("old_logps")
                row["logps"] = logps
                row["old_logps"] = logps if self._round_trips(rollout) else None
        metrics = result.metrics()
        metrics.update(stats)
        lengths = [r.num_tokens for r in rollouts]
        metrics["completions/mean_length"] = sum(lengths) / max(len(lengths), 1)
        metrics["completions/clipped_ratio"] = sum(not r.finished for r in rollouts) / max(len(rollouts), 1)
        return rows, metrics

    def _round_trips(self, rollout: Rollout) -> bool:
        """Whether the data loader, re-encoding the completion text, gets exactly the sampled ids."""
        return encode_completion(self.tokenizer, rollout.completion) == list(rollout.completion_ids)

    def _make_round(self, index: int, steps: int, rows: list[dict], metrics: dict[str, float],
                    num_processes: int) -> _Round:
        examples = [self._example(row) for row in rows]
        chunks: list[list[int]] = []
        repeated = 0
        if steps:
            order = list(range(len(examples)))
            random.Random(derive_seed(self.cfg.train.seed, "order", index)).shuffle(order)
            need = steps * num_processes
            if len(order) < need:  # too few rows even after extra draws: repeat some
                repeated = need - len(order)
                order = [order[i % len(order)] for i in range(need)]
            base, rest = divmod(len(order), steps)
            start = 0
            for s in range(steps):
                size = base + (s < rest)
                chunks.append(order[start:start + size])
                start += size
        else:
            if len(examples) < self.cfg.train.batch_size and _process_info()[1]:
                note(f"the initial policy's samples gave {len(examples)} {self.objective} rows, fewer "
                      f"than train.batch_size={self.cfg.train.batch_size}: every step trains on all of them")
            if len(examples) < num_processes:
                repeated = num_processes - len(examples)
                examples = [examples[i % len(examples)] for i in range(num_processes)]
        metrics = dict(metrics)
        metrics["rollout/repeated_rows"] = float(repeated)
        return _Round(index=index, steps=steps, rows=rows, examples=examples, chunks=chunks, metrics=metrics)

    def _example(self, row: dict) -> dict[str, Any]:
        """A tokenised example straight from the sampled ids (no re-tokenisation), cut to ``data.max_length``."""
        d = self.cfg.data
        prompt = list(row["prompt_ids"])
        if len(prompt) > d.max_prompt_length:  # not reached for our own prompts (too-long ones are left out)
            prompt = truncate_prompt(prompt, d.max_prompt_length, self.tokenizer.bos_token_id)
        room = d.max_length - len(prompt)
        example: dict[str, Any] = {"prompt_ids": prompt}
        if self.objective == "dpo":
            example["chosen_ids"] = list(row["chosen_ids"])[:room]
            example["rejected_ids"] = list(row["rejected_ids"])[:room]
        else:
            example["completion_ids"] = list(row["completion_ids"])[:room]
            if self.objective == "kto":
                example["label"] = bool(row["label"])
            else:
                example["advantage"] = float(row["advantage"])
                example["old_logps"] = [float(v) for v in row["logps"][:room]]
        return example

    # --- files ---------------------------------------------------------------------------------------------
    def round_path(self, index: int) -> Path:
        if self.run_dir is None:
            raise HumanlineError("this rollout source has no run directory")
        return self.run_dir / ROLLOUTS_DIR / f"round-{index:05d}.jsonl"

    def _write_round(self, index: int, steps: int, rows: list[dict], metrics: dict[str, float]) -> None:
        path = self.round_path(index)
        meta = {"round": index, "steps": steps, "objective": self.objective, "rows": len(rows),
                "seed": self.cfg.train.seed, "metrics": metrics}
        # The sidecar first: the JSONL's presence marks a complete round.
        _write_json(path.with_suffix(".json"), meta)
        save_jsonl(rows, path)

    def _read_round(self, index: int) -> _Round | None:
        if self.run_dir is None:
            return None
        path = self.round_path(index)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            note(f"{path} not found: sampling round {index} again from the current policy (the "
                  "resumed run will not match an uninterrupted one exactly)")
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as err:
            raise HumanlineError(f"{path}: cannot read the rollout round to resume: {err}") from err
        if meta.get("objective") != self.objective or len(rows) != meta.get("rows"):
            raise HumanlineError(f"{path}: does not belong to this run (objective {meta.get('objective')!r}, "
                                 f"{len(rows)} rows for {meta.get('rows')}); use a fresh train.output_dir")
        num_processes, _ = _process_info()
        return self._make_round(index, int(meta["steps"]), rows, dict(meta.get("metrics", {})), num_processes)


# ----------------------------------------------------------------------------------------------- building


def build_generator(cfg: Config, model: Any, tokenizer: Any) -> Generator:
    """The configured sampling backend (``rollout.backend``) with the rollout settings."""
    r = cfg.rollout
    kwargs: dict[str, Any] = {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p}
    if r.backend == "hf":
        kwargs["batch_size"] = r.generation_batch_size
    else:
        kwargs["max_model_len"] = cfg.data.max_length
    return make_generator(r.backend, model, tokenizer, **kwargs)


def build_rollout_source(cfg: Config, model: Any, tokenizer: Any, *, prompts: Source | None = None,
                         eval_prompts: Source | None = None, rewards: Any = None,
                         evaluators: list | None = None) -> tuple[RolloutSource, list]:
    """The rollout source of an online / semi-online / initial-policy run, and the evaluators to pass to the
    trainer (``evaluators`` plus a `GenerationEvaluator` when ``eval.generate``).

    ``prompts``: the training prompts (default ``data.train``); ``eval_prompts``: the evaluation prompts
    (default ``data.eval``, else a held-out slice, see `split_eval_prompts`); ``rewards``: see
    `build_reward_set` (default: the config's). ``model`` is the policy the trainer trains: the source samples
    from it (the HF backend uses it directly).
    """
    from humanline.evaluation import build_generation_evaluator

    reward_set = build_reward_set(cfg, rewards)
    train_rows = load_prompt_rows(cfg, prompts if prompts is not None else cfg.data.train, cfg.data.train_split)
    evaluators = list(evaluators or [])
    on_start = []
    if cfg.eval.generate:
        train_rows, evaluator = build_generation_evaluator(cfg, tokenizer, reward_set, train_rows=train_rows,
                                                           eval_prompts=eval_prompts)
        evaluators.append(evaluator)
        on_start.append(evaluator.compute_baseline)
    source = RolloutSource(cfg, build_generator(cfg, model, tokenizer), tokenizer, train_rows, reward_set,
                           policy=lambda: model, run_dir=cfg.train.output_dir, on_start=on_start)
    return source, evaluators
