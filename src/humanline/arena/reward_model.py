"""A small learned reward model for the non-verifiable task, trained on noisy gold-labelled pairs.

The arena's policies never see the gold utility: they are trained against this model, which is
deliberately imperfect (trained on few pairs whose labels are flipped with probability ``flip_prob``,
like human preference data). It is a ``LlamaForSequenceClassification`` (one output, read at the last
non-pad token) over the same character tokenizer as the policy, and scores a (prompt, completion)
exactly as the policy sees it: the chat template applied to [user prompt, assistant completion].
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from humanline.arena.tasks import DescribeTask, Message
from humanline.tiny import build_tokenizer

_META_FILE = "humanline_reward_model.json"
Group = tuple[Any, Sequence[Any]]  # (prompt, responses to it)
Pair = tuple[Any, Any, Any]  # (prompt, better or "chosen" response, worse or "rejected" response)


def chat_text(tokenizer: PreTrainedTokenizerFast, prompt: str | Sequence[Message],
              completion: str | Sequence[Message]) -> str:
    """The text the policy sees for ``prompt`` + ``completion``: the chat template over both turns.

    A plain-string prompt is taken as the user's message and a plain-string completion as the
    assistant's, so strings and chat messages of the same content score the same.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    reply = [{"role": "assistant", "content": completion}] if isinstance(completion, str) else list(completion)
    return tokenizer.apply_chat_template(messages + reply, tokenize=False)


def build_reward_model(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 64, num_layers: int = 2,
                       num_heads: int = 4, max_positions: int = 512, seed: int = 0
                       ) -> LlamaForSequenceClassification:
    """A randomly initialised one-output Llama classifier sharing ``tokenizer``'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=4 * hidden_size, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_positions, num_labels=1,
        # pad_token_id tells the classifier where each row ends (it reads the last non-pad token).
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForSequenceClassification(config)


@dataclass
class RewardModelReport:
    """What training the reward model did and how good it is (accuracies are against noise-free gold)."""

    heldout_accuracy: float  # pairwise accuracy vs gold on held-out prompts
    heldout_pairs: int
    train_accuracy: float  # pairwise accuracy vs gold (not the noisy labels) on a sample of training pairs
    train_pairs: int
    flip_prob: float
    flipped_fraction: float  # labels actually flipped
    steps: int
    seconds: float  # all of it: data, training, evaluation
    train_seconds: float  # data and the optimisation loop, without the final evaluation
    final_loss: float
    reward_mean: float  # raw-score mean / std on training responses, used to standardise outputs
    reward_std: float
    history: list[dict[str, float]] = field(default_factory=list)  # every eval_every steps


def _pad(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return input_ids, mask


def _forward_sorted(model: LlamaForSequenceClassification, ids: Sequence[Sequence[int]], pad_id: int,
                    micro_batch: int) -> torch.Tensor:
    """Raw rewards for ``ids`` in their order, forwarded in length-sorted micro-batches.

    Lengths vary about 4x here, so padding a whole batch to its longest row would waste most of
    the compute; sorting first keeps each micro-batch's rows of similar length.
    """
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    outs = []
    for start in range(0, len(order), micro_batch):
        input_ids, mask = _pad([ids[i] for i in order[start : start + micro_batch]], pad_id)
        outs.append(model(input_ids=input_ids, attention_mask=mask).logits[:, 0].float())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outs)[inverse]


@torch.no_grad()
def _score_ids(model: LlamaForSequenceClassification, ids: Sequence[Sequence[int]], pad_id: int,
               batch_size: int) -> torch.Tensor:
    if not ids:
        return torch.empty(0)
    was_training = model.training
    model.eval()
    try:
        return _forward_sorted(model, ids, pad_id, batch_size)
    finally:
        model.train(was_training)


class RewardModel:
    """A reward callable ``fn(prompts, completions, **columns) -> list[float]`` backed by a classifier.

    Scores are standardised (mean 0, std 1 over the training responses) so that thresholds and KTO
    labels do not depend on the classifier's arbitrary scale. Scoring is batched and without grad.
    """

    __name__ = "reward_model"  # reward callables are named in logs by __name__

    def __init__(self, model: LlamaForSequenceClassification, tokenizer: PreTrainedTokenizerFast, *,
                 mean: float = 0.0, std: float = 1.0, batch_size: int = 64,
                 report: RewardModelReport | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mean, self.std, self.batch_size, self.report = mean, std, batch_size, report

    def raw_scores(self, texts: Sequence[str]) -> torch.Tensor:
        """The classifier's raw outputs for already templated texts."""
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return _score_ids(self.model, ids, self.tokenizer.pad_token_id, self.batch_size)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions must have the same length")
        texts = [chat_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        return ((self.raw_scores(texts) - self.mean) / self.std).tolist()

    def save(self, path: str | os.PathLike) -> Path:
        """Save model (safetensors), tokenizer and standardisation to the folder ``path``."""
        path = Path(path)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        meta = {"mean": self.mean, "std": self.std, "batch_size": self.batch_size,
                "report": asdict(self.report) if self.report else None}
        tmp = path / (_META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, path / _META_FILE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RewardModel:
        """Load a reward model saved with :meth:`save`."""
        path = Path(path)
        meta = json.loads((path / _META_FILE).read_text())
        # PreTrainedTokenizerFast directly: AutoTokenizer could pick a model-specific class (see FACTS).
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        model = LlamaForSequenceClassification.from_pretrained(path)
        report = RewardModelReport(**meta["report"]) if meta.get("report") else None
        return cls(model, tokenizer, mean=meta["mean"], std=meta["std"], batch_size=meta["batch_size"],
                   report=report)


def gold_pairs(groups: Sequence[Group], gold: Callable[[Any, Any], float]) -> list[Pair]:
    """All (prompt, better, worse) pairs within each group whose gold scores differ."""
    pairs = []
    for prompt, responses in groups:
        scores = [gold(prompt, r) for r in responses]
        for i in range(len(responses)):
            for j in range(i + 1, len(responses)):
                if abs(scores[i] - scores[j]) > 1e-6:
                    hi, lo = (i, j) if scores[i] > scores[j] else (j, i)
                    pairs.append((prompt, responses[hi], responses[lo]))
    return pairs


def task_groups(task: DescribeTask, n_prompts: int, k: int, split: str, seed: int = 0) -> list[Group]:
    """``n_prompts`` prompts of ``split``, each with ``k`` responses from the task's SFT data distribution."""
    rows = task.sample_prompts(n_prompts, seed=seed, split=split)
    return [(row["prompt"], task.sample_responses(row["prompt"], k, seed=seed)) for row in rows]


def train_reward_model(
    task: DescribeTask,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    groups: Sequence[Group] | None = None,
    heldout_groups: Sequence[Group] | None = None,
    num_prompts: int = 1000,
    responses_per_prompt: int = 4,
    heldout_prompts: int = 100,
    flip_prob: float = 0.15,
    steps: int = 120,
    batch_groups: int = 8,
    micro_batch: int = 16,
    lr: float = 3e-3,
    warmup_steps: int = 20,
    hidden_size: int = 64,
    num_layers: int = 2,
    max_seconds: float | None = None,
    eval_every: int | None = None,
    eval_size: int = 500,
    seed: int = 0,
) -> RewardModel:
    """Train a reward model with a Bradley-Terry loss on noisy gold-labelled response pairs.

    ``groups`` are ``(prompt, [responses])``; pairs are formed within each group and labelled by the
    task's gold utility, then each label is flipped with probability ``flip_prob``. Without ``groups``,
    ``num_prompts`` train-split prompts get ``responses_per_prompt`` responses each from the task's SFT
    data distribution. Accuracy is measured against noise-free gold on ``heldout_groups`` (default:
    validation-split prompts with responses from the same distribution). ``max_seconds`` stops the
    loop early (the step count is then machine-dependent); ``eval_every`` records held-out accuracy
    during training in ``report.history``; ``eval_size`` caps the training responses used to standardise
    scores and the training pairs whose accuracy is reported. Seeded and deterministic on one thread.
    """
    started = time.perf_counter()
    tokenizer = tokenizer or build_tokenizer()
    if groups is None:
        groups = task_groups(task, num_prompts, responses_per_prompt, "train", seed)
    if heldout_groups is None:
        heldout_groups = task_groups(task, heldout_prompts, responses_per_prompt, "validation", seed)

    # Every distinct (prompt, response) text is templated and tokenised once; pairs hold indices.
    index: dict[str, int] = {}
    ids: list[list[int]] = []

    def idx(prompt: Any, completion: Any) -> int:
        text = chat_text(tokenizer, prompt, completion)
        if text not in index:
            index[text] = len(ids)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        return index[text]

    # Pairs stay grouped by prompt: a step trains on every pair of the groups it draws, so k responses
    # forwarded once give up to k(k-1)/2 comparisons (as in InstructGPT's reward model training).
    by_group = [[(idx(p, hi), idx(p, lo)) for p, hi, lo in gold_pairs([group], task.gold_one)] for group in groups]
    by_group = [g for g in by_group if g]
    held = [(idx(p, hi), idx(p, lo)) for p, hi, lo in gold_pairs(heldout_groups, task.gold_one)]
    if not by_group:
        raise ValueError("no response pairs with different gold scores to train the reward model on")
    train = [pair for g in by_group for pair in g]
    rng = random.Random(seed)
    flips = [rng.random() < flip_prob for _ in train]
    # Noisy labels: a flipped pair is trained as if the worse response were the better one.
    flip_iter = iter(flips)
    noisy = [[(lo, hi) if next(flip_iter) else (hi, lo) for hi, lo in g] for g in by_group]
    pad_id = tokenizer.pad_token_id

    def accuracy(which: Sequence[tuple[int, int]]) -> float:
        if not which:
            return math.nan
        needed = sorted({i for pair in which for i in pair})
        raw = dict(zip(needed, _score_ids(model, [ids[i] for i in needed], pad_id, 128).tolist()))
        return sum(raw[hi] > raw[lo] for hi, lo in which) / len(which)

    model = build_reward_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))
    model.train()
    loss_value, done, history = math.nan, 0, []
    for step in range(steps):
        if max_seconds is not None and time.perf_counter() - started > max_seconds:
            break
        batch = [pair for _ in range(batch_groups) for pair in noisy[rng.randrange(len(noisy))]]
        rows = sorted({i for pair in batch for i in pair})
        where = {i: n for n, i in enumerate(rows)}
        rewards = _forward_sorted(model, [ids[i] for i in rows], pad_id, micro_batch)
        chosen = rewards[torch.tensor([where[c] for c, _ in batch])]
        rejected = rewards[torch.tensor([where[r] for _, r in batch])]
        loss = -F.logsigmoid(chosen - rejected).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value, done = loss.item(), step + 1
        if eval_every and done % eval_every == 0:
            history.append({"step": done, "seconds": time.perf_counter() - started,
                            "heldout_accuracy": accuracy(held)})
    train_seconds = time.perf_counter() - started

    # Standardise on up to eval_size training responses; train accuracy on up to eval_size pairs.
    sample = random.Random(seed + 1)
    responses = sorted({i for pair in train for i in pair})
    raw = _score_ids(model, [ids[i] for i in sample.sample(responses, min(len(responses), eval_size))], pad_id, 128)
    mean = raw.mean().item()
    std = max(raw.std().item(), 1e-6) if len(raw) > 1 else 1.0
    report = RewardModelReport(
        heldout_accuracy=accuracy(held), heldout_pairs=len(held),
        train_accuracy=accuracy(sample.sample(train, min(len(train), eval_size))), train_pairs=len(train),
        flip_prob=flip_prob, flipped_fraction=sum(flips) / len(flips), steps=done,
        seconds=time.perf_counter() - started, train_seconds=train_seconds, final_loss=loss_value,
        reward_mean=mean, reward_std=std, history=history,
    )
    return RewardModel(model, tokenizer, mean=mean, std=std, report=report)


def gold_agreement(reward: Callable[..., list[float]], task: DescribeTask, groups: Sequence[Group]) -> float:
    """Pairwise accuracy of any reward callable against gold on ``groups`` (e.g. a policy's samples)."""
    pairs = gold_pairs(groups, task.gold_one)
    if not pairs:
        return math.nan
    prompts = [p for p, _, _ in pairs]
    better = reward(prompts, [hi for _, hi, _ in pairs])
    worse = reward(prompts, [lo for _, _, lo in pairs])
    return sum(b > w for b, w in zip(better, worse)) / len(pairs)
