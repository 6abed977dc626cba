"""Rewards: one callable interface, built-in verifiers, a reward-model scorer, loading by name, safe calling.

A reward is any callable ``reward(prompts, completions, **columns) -> list[float]`` (TRL's convention):
``prompts[i]`` is the prompt (text or chat messages), ``completions[i]`` the completion text, and every extra
data set column comes as a keyword argument holding a list aligned with ``prompts`` (e.g. ``answer=[...]``).
Rewards should accept ``**kwargs`` so unrelated columns pass through.

`RewardSet` calls rewards and checks what comes back: a reward that raises, returns the wrong number of
values, a non-number or NaN/inf raises `RewardError` naming the reward and the prompt. A bad score is never
silently replaced by 0.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from humanline.errors import HumanlineError, RewardError

RewardFn = Callable[..., Sequence[float]]

# ---------------------------------------------------------------------------------------- answer extraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A number: optional minus (not a hyphen between words/numbers, e.g. "3-5"), thousands groups or plain digits,
# optional decimals. Not preceded by a letter, digit or dot, so "v2" or the "5" of "3.5" are not numbers.
_NUMBER = re.compile(r"(?<![\w.])(?:(?<![\w)\]])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent/unclosed."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer in a completion: the last ``\\boxed{...}`` (nested braces kept), else what follows the
    last ``####`` on its line (GSM8K), else the last number in the text. None if there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip()
    numbers_found = _NUMBER.findall(text)
    return numbers_found[-1] if numbers_found else None


def normalize_answer(answer: str) -> str:
    """A canonical form for comparison. Numbers (commas, ``$``, ``%`` and a trailing dot aside) compare by
    value: "1,234" == "1234", "3.50" == "3.5", "-0" == "0". Other answers: ``\\text{..}`` unwrapped, lower
    case, whitespace and surrounding ``$`` removed."""
    text = answer.strip().strip("$").strip()
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    text = text.replace("{,}", ",").replace("\\!", "").replace("\\%", "%")
    candidate = text.replace(",", "").replace("$", "").rstrip(".").rstrip("%").strip()
    if re.fullmatch(r"[-+]?(\d+(\.\d*)?|\.\d+)", candidate):
        try:
            value = Decimal(candidate)
        except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
            pass
        else:
            if value == value.to_integral_value():
                return str(int(value))
            return format(value.normalize(), "f")
    return re.sub(r"\s+", "", text).lower()


def _reference(gold: Any) -> str:
    """The reference answer of a row: GSM8K-style solutions ("... #### 42") and boxed answers are reduced to
    the answer; anything else is taken whole (so "\\frac{1}{2}" is not cut to its last number)."""
    text = str(gold)
    if "####" in text or _BOXED.search(text):
        found = extract_answer(text)
        if found is not None:
            return found
    return text


def _column(columns: dict[str, Any], name: str, reward: str) -> list[Any]:
    if name not in columns:
        raise HumanlineError(f"reward '{reward}' needs a '{name}' column in the data set; columns: "
                             f"{', '.join(sorted(columns)) or 'none'}")
    return list(columns[name])


# ------------------------------------------------------------------------------------------------ built-ins


def exact_match_reward(prompts: list, completions: list[str], **columns: Any) -> list[float]:
    """1.0 when the completion's extracted answer (`extract_answer`) equals the ``answer`` column after
    `normalize_answer`, else 0.0 (also 0.0 when no answer can be extracted)."""
    answers = _column(columns, "answer", "exact_match")
    scores = []
    for completion, gold in zip(completions, answers):
        found = extract_answer(completion)
        match = found is not None and normalize_answer(found) == normalize_answer(_reference(gold))
        scores.append(float(match))
    return scores


exact_match_reward.__name__ = "exact_match"


def math_verify_reward(prompts: list, completions: list[str], **columns: Any) -> list[float]:
    """1.0 when `math_verify` finds the completion's answer mathematically equal to the ``answer`` column
    (``\\frac12`` == ``0.5``, ...), else 0.0. Needs ``pip install 'humanline[math]'``."""
    try:
        from math_verify import parse, verify
    except ImportError as err:
        raise HumanlineError("the math_verify reward needs math-verify: "
                             "pip install 'humanline[math]'") from err
    answers = _column(columns, "answer", "math_verify")
    scores = []
    for completion, gold in zip(completions, answers):
        reference = _reference(gold)
        # A bare reference like "42" or "\frac{1}{2}" parses best inside math delimiters.
        gold_parsed = parse(reference if "$" in reference or "\\boxed" in reference else f"${reference}$")
        scores.append(float(bool(gold_parsed) and verify(gold_parsed, parse(completion))))
    return scores


math_verify_reward.__name__ = "math_verify"

# Some reasoning (at least one non-space character), then a last line "#### <answer>" (GSM8K's answer format),
# trailing whitespace allowed.
DEFAULT_FORMAT_PATTERN = r"\s*\S.*\n####[ \t]*[^\s#][^\n]*\s*"


def format_reward(pattern: str = DEFAULT_FORMAT_PATTERN, *, flags: int = re.DOTALL) -> RewardFn:
    """A reward of 1.0 when the whole completion matches ``pattern`` (``re.fullmatch``), else 0.0. The default
    asks for reasoning followed by a final ``#### <answer>`` line."""
    try:
        regex = re.compile(pattern, flags)
    except re.error as err:
        raise HumanlineError(f"format reward: bad regular expression {pattern!r}: {err}") from err

    def format_(prompts: list, completions: list[str], **columns: Any) -> list[float]:
        return [float(regex.fullmatch(c) is not None) for c in completions]

    format_.__name__ = "format"
    return format_


def combine_rewards(fns_with_weights: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """One reward: the weighted sum of several, each checked like in `RewardSet`."""
    reward_set = RewardSet([fn for fn, _ in fns_with_weights], weights=[w for _, w in fns_with_weights])

    def combined(prompts: list, completions: list[str], **columns: Any) -> list[float]:
        return reward_set(prompts, completions, **columns).scores

    combined.__name__ = "+".join(reward_set.names)
    return combined


# -------------------------------------------------------------------------------------------- reward model


def _as_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    return "\n".join(str(m.get("content", "")) for m in prompt)


class RewardModelScorer:
    """A sequence-classification reward model, scored with its OWN tokenizer and chat template.

    Each (prompt, completion) becomes a conversation (the prompt's messages, or one user turn, then the
    completion as the assistant turn) rendered with the reward model's chat template; without a template the
    text is ``prompt + completion``. Sequences longer than ``max_length`` lose tokens from the left, so the
    end (where the score is read) stays. Returns ``logits[:, 0]``.
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, batch_size: int = 16, max_length: int = 4096,
                 device: str | torch.device | None = None, dtype: Any = None, trust_remote_code: bool = False,
                 name: str = "reward_model") -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.__name__ = name
        if isinstance(model, str):
            try:
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(
                    model, trust_remote_code=trust_remote_code)
                model = AutoModelForSequenceClassification.from_pretrained(
                    model, trust_remote_code=trust_remote_code, dtype=dtype or "auto")
            except (OSError, ValueError) as err:
                raise HumanlineError(f"cannot load reward model '{model}': {_first_line(err)}") from err
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
        if tokenizer is None:
            raise HumanlineError("RewardModelScorer: pass the reward model's tokenizer with a model object")
        if device is not None:
            model = model.to(device)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise HumanlineError("reward model tokenizer has neither a pad nor an EOS token")
        self.pad_id = int(pad)
        if model.config.pad_token_id is None:
            # The classifier reads the score at the last non-pad token, so it must know the pad id.
            model.config.pad_token_id = self.pad_id

    def encode(self, prompt: Any, completion: str) -> list[int]:
        """Token ids of one (prompt, completion) as the reward model sees them."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = list(prompt) if not isinstance(prompt, str) else [{"role": "user", "content": prompt}]
            text = tok.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]  # the template has the special tokens
        else:
            ids = tok(_as_text(prompt) + completion)["input_ids"]
        return ids[-self.max_length:]

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> list[float]:
        device = next(self.model.parameters()).device
        scores: list[float] = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                end = start + self.batch_size
                batch = [self.encode(p, c) for p, c in zip(prompts[start:end], completions[start:end])]
                width = max(len(ids) for ids in batch)
                input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, ids in enumerate(batch):  # right padding: the classifier finds the last real token
                    input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[row, :len(ids)] = 1
                logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


# ------------------------------------------------------------------------------------------------ loading

BUILTINS: dict[str, Callable[[], RewardFn]] = {
    "exact_match": lambda: exact_match_reward,
    "math_verify": lambda: math_verify_reward,
    "format": format_reward,
}


def load_reward(spec: str) -> RewardFn:
    """A reward by built-in name (``exact_match``, ``math_verify``, ``format``) or by import path
    ``package.module:function`` (the module must be importable, e.g. on ``PYTHONPATH``)."""
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]()
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise HumanlineError(f"unknown reward '{spec}': use one of {', '.join(BUILTINS)} or an import path "
                             "'package.module:function'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # any import failure (missing module, error inside it) is a user error here
        raise HumanlineError(f"reward '{spec}': cannot import '{module_name}': "
                             f"{type(err).__name__}: {_first_line(err)}") from err
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise HumanlineError(f"reward '{spec}': module '{module_name}' has no attribute '{attr}'")
    if not callable(fn):
        raise HumanlineError(f"reward '{spec}': '{attr}' is not callable")
    return fn


# --------------------------------------------------------------------------------------------- safe calling


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _short(prompt: Any, limit: int = 80) -> str:
    """A prompt on one line, at most ``limit`` characters (for messages: the last message's content)."""
    if not isinstance(prompt, str):
        prompt = prompt[-1].get("content", "") if prompt and isinstance(prompt[-1], dict) else str(prompt)
    text = " ".join(str(prompt).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def reward_name(fn: Any) -> str:
    return str(getattr(fn, "__name__", None) or type(fn).__name__)


@dataclass
class RewardResult:
    """Scores of one batch: the weighted total and each reward's own values (for logging)."""

    scores: list[float]
    per_reward: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``rewards/<name>/mean`` and ``/std`` per reward; ``reward/mean`` and ``/std`` for the total."""
        out: dict[str, float] = {}
        for name, values in [*self.per_reward.items(), (None, self.scores)]:
            t = torch.tensor(values, dtype=torch.float64)
            prefix = f"rewards/{name}" if name is not None else "reward"
            out[f"{prefix}/mean"] = float(t.mean()) if len(values) else math.nan
            out[f"{prefix}/std"] = float(t.std(unbiased=False)) if len(values) else math.nan
        return out


class RewardSet:
    """Several rewards (callables or `load_reward` specs) with weights (default 1 each), called safely."""

    def __init__(self, rewards: Sequence[RewardFn | str], weights: Sequence[float] | None = None) -> None:
        if not rewards:
            raise HumanlineError("no reward function given")
        if weights is not None and len(weights) != len(rewards):
            raise HumanlineError(f"{len(rewards)} rewards but {len(weights)} weights")
        self.fns = [load_reward(r) if isinstance(r, str) else r for r in rewards]
        self.weights = [float(w) for w in weights] if weights is not None else [1.0] * len(self.fns)
        self.names: list[str] = []
        for fn in self.fns:  # unique names for logging: "format", "format_2", ...
            base = reward_name(fn)
            name, k = base, 1
            while name in self.names:
                k += 1
                name = f"{base}_{k}"
            self.names.append(name)

    def __call__(self, prompts: list, completions: list[str], **columns: Any) -> RewardResult:
        if len(completions) != len(prompts):
            raise RewardError(f"{len(prompts)} prompts but {len(completions)} completions")
        for key, values in columns.items():
            if len(values) != len(prompts):
                raise RewardError(f"column '{key}' has {len(values)} values for {len(prompts)} prompts")
        per_reward = {name: call_reward(fn, prompts, completions, columns, name=name)
                      for name, fn in zip(self.names, self.fns)}
        totals = [sum(w * per_reward[name][i] for name, w in zip(self.names, self.weights))
                  for i in range(len(prompts))]
        return RewardResult(scores=totals, per_reward=per_reward)


def call_reward(fn: RewardFn, prompts: list, completions: list[str], columns: dict[str, Any], *,
                name: str | None = None) -> list[float]:
    """Call one reward and check its output; any problem raises `RewardError` naming the reward and the first
    offending prompt."""
    name = name or reward_name(fn)
    columns = {k: list(v) for k, v in columns.items()}
    try:
        values = fn(prompts, completions, **columns)
    except HumanlineError:
        raise  # already a one-line user error (e.g. a missing column or package)
    except Exception as err:
        culprit = _find_raising_prompt(fn, prompts, completions, columns)
        where = f" (prompt: {_short(prompts[culprit])!r})" if prompts else ""
        raise RewardError(f"reward '{name}' raised {type(err).__name__}: {_first_line(err)}{where}") from err
    if isinstance(values, torch.Tensor) or hasattr(values, "tolist"):
        values = values.tolist()
    first = _short(prompts[0]) if prompts else ""
    if not isinstance(values, (list, tuple)):
        raise RewardError(f"reward '{name}' returned {type(values).__name__}, not a list of numbers "
                          f"(prompt: {first!r})")
    if len(values) != len(prompts):
        raise RewardError(f"reward '{name}' returned {len(values)} values for {len(prompts)} completions "
                          f"(first prompt: {first!r})")
    out = []
    for i, v in enumerate(values):
        if not isinstance(v, numbers.Real):  # bools count (True = 1.0); None, str, tensors... do not
            raise RewardError(f"reward '{name}' returned {type(v).__name__} {v!r}, not a number "
                              f"(prompt: {_short(prompts[i])!r})")
        if not math.isfinite(float(v)):
            raise RewardError(f"reward '{name}' returned {float(v)} (prompt: {_short(prompts[i])!r})")
        out.append(float(v))
    return out


def _find_raising_prompt(fn: RewardFn, prompts: list, completions: list[str], columns: dict[str, Any],
                         limit: int = 64) -> int:
    """Index of the first sample the reward raises on alone (error path only; at most ``limit`` tries); 0 when
    none does alone."""
    for i in range(min(len(prompts), limit)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return i
    return 0


def score(reward_fns: Sequence[RewardFn | str] | RewardSet, prompts: list, completions: list[str],
          columns: dict[str, Sequence[Any]] | None = None,
          weights: Sequence[float] | None = None) -> RewardResult:
    """Score completions with one or several rewards (see `RewardSet`)."""
    reward_set = reward_fns if isinstance(reward_fns, RewardSet) else RewardSet(reward_fns, weights)
    return reward_set(prompts, completions, **(columns or {}))
