"""The arena's two synthetic tasks: one verifiable, one judged by a hidden gold preference.

* ``AdditionTask`` (verifiable): "274+358" is answered column by column with written carries,
  ``"4+8=12 c1; 7+5+1=13 c1; 2+3+1=6; #### 632"``, and rewarded 1.0 for the exact final answer after
  ``####``. The rationale makes responses tens of tokens long, so per-token effects have room to show.
* ``DescribeTask`` (non-verifiable): "describe the red fox at the river" is answered with a few short
  sentences. A hidden, noise-free gold utility scores them (keywords covered, no off-topic words, no
  repeated sentence, a length band, a polite sign-off). Training only ever sees a small learned reward
  model (``reward_model.py``); evaluation uses the gold utility.

Both tasks produce rows in TRL's conversational format. Prompts fall into disjoint train / validation /
test splits by a stable hash of their content, so no split can leak into another whatever the seeds.
Rewards follow the library's interface ``fn(prompts, completions, **columns) -> list[float]``, where
prompts and completions are plain strings or lists of chat messages, and columns are lists.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from typing import Any

SPLITS = ("train", "validation", "test")
# Hash buckets out of 10: 80% train, 10% validation, 10% test.
_SPLIT_BUCKETS = {"train": range(0, 8), "validation": range(8, 9), "test": range(9, 10)}

Message = dict[str, str]
Row = dict[str, Any]


def split_of(key: str) -> str:
    """The split a prompt belongs to, from a stable hash of ``key`` (not Python's salted ``hash``)."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def message_text(x: str | Sequence[Message] | Message) -> str:
    """The text of a prompt or completion: a string as is, a chat's last message's content."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return str(x.get("content", ""))
    return str(x[-1]["content"]) if len(x) else ""


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _rng(*parts: object) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and processes.
    return random.Random(":".join(map(str, parts)))


def _user(content: str) -> list[Message]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[Message]:
    return [{"role": "assistant", "content": content}]


def _distinct_in_split(n: int, split: str, draw, key, max_tries: int) -> list:
    """Draw items with ``draw()`` until ``n`` distinct ones (by ``key``) fall in ``split``."""
    seen: set[str] = set()
    out = []
    for _ in range(max_tries):
        item = draw()
        k = key(item)
        if k in seen or split_of(k) != split:
            continue
        seen.add(k)
        out.append(item)
        if len(out) == n:
            return out
    raise ValueError(f"could not find {n} distinct prompts in split {split!r}; the task's prompt space is too small")


# ------------------------------------------------------------------------------------------------
# Verifiable: column-by-column addition.

_ANSWER_RE = re.compile(r"-?\d+")


def extract_answer(completion: str | Sequence[Message]) -> str | None:
    """The final answer: what follows the first ``####``, if that is exactly an integer (spaces aside).

    Strict on purpose: ``"#### 632"`` gives ``"632"``; ``"#### 632."``, ``"#### 6 32"``, ``"####"`` and a
    response without ``####`` give None. Leading zeros are normalised (``"0632"`` gives ``"632"``).
    """
    text = message_text(completion)
    head, sep, tail = text.partition("####")
    if not sep:
        return None
    tail = tail.strip()
    if not _ANSWER_RE.fullmatch(tail):
        return None
    return str(int(tail))


class AdditionTask:
    """Add ``terms`` numbers of ``digits`` digits each, written out column by column.

    The gold rationale adds one column per step, least significant first, and writes the carry it passes
    on: ``"4+8=12 c1; 7+5+1=13 c1; 2+3+1=6; #### 632"``. The answer must then be read back from the
    steps' last digits in reverse order, which is where a half-trained model slips.
    """

    name = "addition"
    columns: tuple[str, ...] = ("answer",)
    metric_name = "greedy accuracy (exact answer)"

    def __init__(self, digits: int = 3, terms: int = 2) -> None:
        if digits < 1 or terms < 2:
            raise ValueError("digits must be >= 1 and terms >= 2")
        self.digits, self.terms = digits, terms

    # -- problems ------------------------------------------------------------------------------
    def _draw(self, rng: random.Random) -> tuple[int, ...]:
        lo, hi = 10 ** (self.digits - 1), 10**self.digits - 1
        return tuple(rng.randint(lo, hi) for _ in range(self.terms))

    @staticmethod
    def prompt_text(operands: Sequence[int]) -> str:
        return "+".join(map(str, operands))

    @staticmethod
    def solution(operands: Sequence[int]) -> str:
        """The gold rationale and answer for ``operands`` (all of the same number of digits)."""
        texts = [str(x) for x in operands]
        width = max(map(len, texts))
        texts = [t.zfill(width) for t in texts]
        steps, carry = [], 0
        for col in range(width - 1, -1, -1):
            parts = [int(t[col]) for t in texts] + ([carry] if carry else [])
            total = sum(parts)
            carry = total // 10
            steps.append("+".join(map(str, parts)) + f"={total}" + (f" c{carry}" if carry else ""))
        return "; ".join(steps) + f"; #### {sum(operands)}"

    def _row(self, operands: tuple[int, ...]) -> Row:
        return {"prompt": _user(self.prompt_text(operands)), "answer": str(sum(operands))}

    def sample_prompts(self, n: int, seed: int = 0, split: str = "test") -> list[Row]:
        """``n`` distinct prompt-only rows of ``split``: ``{"prompt": [user message], "answer": "632"}``."""
        _check_split(split)
        rng = _rng(self.name, self.digits, self.terms, split, seed)
        problems = _distinct_in_split(n, split, lambda: self._draw(rng), self.prompt_text, 200 * n + 10_000)
        return [self._row(p) for p in problems]

    def sft_rows(self, n: int, seed: int = 0, split: str = "train") -> list[Row]:
        """``n`` prompt-completion rows whose completions are the gold rationale (for the starting SFT)."""
        rows = self.sample_prompts(n, seed=seed, split=split)
        for row in rows:
            operands = tuple(int(x) for x in message_text(row["prompt"]).split("+"))
            row["completion"] = _assistant(self.solution(operands))
        return rows

    # -- scoring -------------------------------------------------------------------------------
    def reward(self, prompts: Sequence[Any], completions: Sequence[Any], answer: Sequence[str],
               **_: Any) -> list[float]:
        """1.0 where the final answer after ``####`` equals ``answer`` exactly, else 0.0 (pure accuracy)."""
        if not (len(prompts) == len(completions) == len(answer)):
            raise ValueError("prompts, completions and answer must have the same length")
        return [float(extract_answer(c) == str(int(a))) for c, a in zip(completions, answer)]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """The evaluation metric per completion: the verifier's reward."""
        return self.reward(prompts, completions, **columns)


# ------------------------------------------------------------------------------------------------
# Non-verifiable: short descriptions judged by a hidden gold utility.

ADJECTIVES = ("red", "blue", "green", "brown", "small", "big", "old", "young",
              "calm", "quick", "quiet", "bright", "dark", "wild", "shy", "happy")
NOUNS = ("fox", "cat", "dog", "owl", "bear", "fish", "bird", "frog",
         "wolf", "deer", "duck", "goat", "mouse", "horse", "crab", "bee")
PLACES = ("river", "forest", "hill", "lake", "field", "garden", "cave", "beach",
          "farm", "road", "park", "town", "pond", "barn", "meadow", "valley")
LIVELY_VERBS = ("runs", "plays", "walks")  # the hidden taste: gold prefers these ...
DULL_VERBS = ("sits", "sleeps", "waits", "hides", "rests")  # ... over these
VERBS = LIVELY_VERBS + DULL_VERBS
PREPOSITIONS = ("near", "in", "by", "at")
SIGN_OFF = "hope this helps!"
LEXICON = frozenset(ADJECTIVES + NOUNS + PLACES)

_PROMPT_RE = re.compile(r"describe the (\w+) (\w+) at the (\w+)")
_WORD_RE = re.compile(r"[a-z]+")
_SENTENCE_RE = re.compile(r"[.!?]")


class DescribeTask:
    """Describe an (adjective, animal, place) triple; a hidden gold utility judges the description.

    Gold utility, noise-free, about -3 .. 2 (higher is better; the SFT data average about 0):
      + 0.8 x fraction of the three prompt keywords mentioned
      - 0.2 per distinct off-topic lexicon word (an adjective / animal / place not in the prompt)
      - 0.4 per repeated sentence
      - 0.5 x (characters outside the band [length_lo, length_hi]) / 20, at most 1.0
      + 0.4 if the response ends with the sign-off "hope this helps!"
      + 0.3 per lively verb (runs, plays, walks), - 0.3 per dull one (sits, sleeps, waits, hides, rests)

    The first two terms need the prompt; the others can be read off the response alone, and a small
    reward model learns those first (a prompt-blind oracle ranks about 83% of SFT-data pairs right).
    A verb is a local choice of a few characters that the SFT data make at random: room for per-token credit.
    """

    name = "describe"
    columns: tuple[str, ...] = ()
    metric_name = "gold win rate vs the starting policy"

    def __init__(self, length_lo: int = 40, length_hi: int = 100, max_sentences: int = 4) -> None:
        self.length_lo, self.length_hi, self.max_sentences = length_lo, length_hi, max_sentences

    # -- prompts -------------------------------------------------------------------------------
    @staticmethod
    def prompt_text(keywords: Sequence[str]) -> str:
        adj, noun, place = keywords
        return f"describe the {adj} {noun} at the {place}"

    @staticmethod
    def keywords(prompt: str | Sequence[Message]) -> tuple[str, str, str]:
        """The (adjective, animal, place) a prompt asks about."""
        m = _PROMPT_RE.search(message_text(prompt))
        if not m:
            raise ValueError(f"not a describe prompt: {message_text(prompt)!r}")
        return m.group(1), m.group(2), m.group(3)

    def sample_prompts(self, n: int, seed: int = 0, split: str = "test") -> list[Row]:
        """``n`` distinct prompt-only rows of ``split`` (of 4096: 3309 train, 386 validation, 401 test)."""
        _check_split(split)
        rng = _rng(self.name, split, seed)

        def draw() -> tuple[str, str, str]:
            return rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(PLACES)

        available = self.prompt_count(split)
        if n > available:
            raise ValueError(f"split {split!r} of the describe task has only {available} distinct prompts, "
                             f"asked for {n}")
        triples = _distinct_in_split(n, split, draw, self.prompt_text, 200 * n + 50_000)
        return [{"prompt": _user(self.prompt_text(t))} for t in triples]

    def prompt_count(self, split: str) -> int:
        """How many distinct prompts ``split`` holds."""
        _check_split(split)
        return sum(split_of(self.prompt_text((a, n, p))) == split
                   for a in ADJECTIVES for n in NOUNS for p in PLACES)

    # -- responses of mixed quality ------------------------------------------------------------
    def sample_response(self, keywords: Sequence[str], rng: random.Random, quality: float | None = None) -> str:
        """One response from the SFT data distribution; ``quality`` in [0, 1] (drawn uniformly if None).

        Low quality swaps keywords for off-topic words, writes more sentences, repeats one and rarely
        signs off; high quality does the opposite. The mixture makes an SFT policy mediocre under gold.
        """
        q = rng.random() if quality is None else quality
        adj, noun, place = keywords
        p_swap = 0.6 * (1.0 - q)

        def pick(word: str, pool: Sequence[str]) -> str:
            return rng.choice([w for w in pool if w != word]) if rng.random() < p_swap else word

        def sentence() -> str:
            kind = rng.randrange(4)
            if kind == 0:
                return (f"the {pick(adj, ADJECTIVES)} {pick(noun, NOUNS)} {rng.choice(VERBS)} "
                        f"{rng.choice(PREPOSITIONS)} the {pick(place, PLACES)}.")
            if kind == 1:
                return f"the {pick(noun, NOUNS)} is {pick(adj, ADJECTIVES)}."
            if kind == 2:
                return f"it {rng.choice(VERBS)} {rng.choice(PREPOSITIONS)} the {pick(place, PLACES)}."
            return f"the {pick(place, PLACES)} is {rng.choice(ADJECTIVES)}."

        count = rng.choice((1, 2, 2, 3)) if q > 0.5 else rng.randint(1, self.max_sentences)
        sentences = [sentence() for _ in range(count)]
        if rng.random() < 0.5 * (1.0 - q):
            sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(sentences))
        if rng.random() < q:
            sentences.append(SIGN_OFF)
        return " ".join(sentences)

    def sample_responses(self, prompt: str | Sequence[Message], k: int, seed: int = 0) -> list[str]:
        """``k`` responses to ``prompt`` from the SFT data distribution (seeded per prompt)."""
        rng = _rng(self.name, "responses", message_text(prompt), seed)
        kw = self.keywords(prompt)
        return [self.sample_response(kw, rng) for _ in range(k)]

    def sft_rows(self, n: int, seed: int = 0, split: str = "train") -> list[Row]:
        """``n`` prompt-completion rows, one mixed-quality response each.

        Beyond the split's distinct prompts (about 3,300 in train) prompts repeat, with fresh responses.
        """
        distinct = self.sample_prompts(min(n, self.prompt_count(split)), seed=seed, split=split)
        rng = _rng(self.name, "sft", split, seed)
        rows = []
        for i in range(n):
            prompt = _user(message_text(distinct[i % len(distinct)]["prompt"]))  # a fresh list per row
            rows.append({"prompt": prompt, "completion": _assistant(self.sample_response(self.keywords(prompt), rng))})
        return rows

    # -- scoring -------------------------------------------------------------------------------
    def gold_one(self, prompt: str | Sequence[Message], completion: str | Sequence[Message]) -> float:
        """The hidden gold utility of one response (see the class docstring)."""
        keywords = self.keywords(prompt)
        text = message_text(completion).strip()
        words = _WORD_RE.findall(text.lower())
        coverage = sum(k in words for k in keywords) / len(keywords)
        off_topic = len({w for w in words if w in LEXICON} - set(keywords))
        sentences = [s.strip() for s in _SENTENCE_RE.split(text.lower()) if s.strip()]
        repeats = len(sentences) - len(set(sentences))
        outside = max(0, self.length_lo - len(text), len(text) - self.length_hi)
        signed = text.endswith(SIGN_OFF)
        verbs = sum(w in LIVELY_VERBS for w in words) - sum(w in DULL_VERBS for w in words)
        return (0.8 * coverage - 0.2 * off_topic - 0.4 * repeats - min(1.0, 0.5 * outside / 20)
                + 0.4 * signed + 0.3 * verbs)

    def gold_score(self, prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        """Gold utility per completion, in the reward interface (for evaluation only, never training)."""
        if len(prompts) != len(completions):
            raise ValueError("prompts and completions must have the same length")
        return [self.gold_one(p, c) for p, c in zip(prompts, completions)]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """The per-completion evaluation score: the gold utility."""
        return self.gold_score(prompts, completions)

    def win_rate(self, prompts: Sequence[Any], completions: Sequence[Any],
                 baseline_completions: Sequence[Any]) -> float:
        """Fraction of prompts where ``completions`` beat ``baseline_completions`` under gold (ties: 0.5)."""
        ours = self.gold_score(prompts, completions)
        theirs = self.gold_score(prompts, baseline_completions)
        if not ours:
            raise ValueError("win_rate needs at least one prompt")
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs)]
        return sum(wins) / len(wins)


TASKS = {"addition": AdditionTask, "describe": DescribeTask}


def make_task(name: str, **kwargs: Any) -> AdditionTask | DescribeTask:
    """A task by name (``addition`` or ``describe``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
