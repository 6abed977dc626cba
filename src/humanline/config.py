"""Typed run configuration: dataclasses, YAML recipes, dotted ``key=value`` overrides, validation.

Everything is checked before a model loads: unknown keys, wrong types, out-of-range values and impossible
combinations raise :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = ""  # hub id or local folder
    gguf_file: str | None = None  # a GGUF file inside name_or_path (needs the `gguf` package)
    tokenizer: str | None = None  # defaults to name_or_path
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # off unless the user asks
    revision: str | None = None


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: all linear layers
    merge_at_end: bool = False


@dataclass
class DataConfig:
    train: str = ""  # a local JSON/JSONL/Parquet/CSV file or a hub data set name
    eval: str | None = None
    train_split: str = "train"
    eval_split: str = "test"
    subset: str | None = None  # hub data set configuration name
    columns: dict[str, str] = field(default_factory=dict)  # our name -> the data set's column
    max_prompt_length: int = 512
    max_length: int = 1024
    eval_size: float = 0.0  # carve this fraction (or count when >= 1) of train off as eval when no eval set


@dataclass
class LossConfig:
    objective: Literal["sft", "dpo", "kto", "grpo"] = "dpo"
    beta: float = 0.1  # DPO / KTO
    desirable_weight: float = 1.0  # KTO
    undesirable_weight: float = 1.0
    epsilon_low: float = 0.2  # GRPO
    epsilon_high: float = 0.2
    kl_beta: float = 0.0  # GRPO k3 penalty weight
    loss_type: Literal["grpo", "dapo", "dr_grpo"] = "dapo"
    max_completion_length: int | None = None  # dr_grpo; defaults to rollout.max_new_tokens or data.max_length


@dataclass
class HumanlineConfig:
    enabled: bool = False  # the switch: synced reference + per-token clipping
    log_eps_P: float = -1.0
    log_eps_R: float = 1.5
    clip: Literal["clamp", "reject", "none"] = "clamp"  # "none": syncing only (ablation)
    reject_gamma: float = 1.0  # Beta(gamma, 1) thresholds of the "reject" mode


@dataclass
class ReferenceConfig:
    # auto: "sync" when humanline is enabled, else "frozen" (the initial model).
    mode: Literal["auto", "frozen", "sync", "ema"] = "auto"
    sync_every: int = 1  # k: the reference takes the policy's pre-update weights every k steps
    ema_alpha: float = 0.5  # ema mode: ref = a * policy + (1 - a) * ref at each sync (TR-DPO style)
    # frozen reference, offline data, not KTO: reference log-probs computed once before training (no reference copy
    # in memory), cached in <train.output_dir>/cache keyed by model + data + tokenisation (precompute.py)
    precompute: bool = False


@dataclass
class OptimConfig:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_ratio: float = 0.1
    max_grad_norm: float | None = 1.0


@dataclass
class RewardSpec:
    name: str = ""  # built-in name or import path "package.module:function"
    weight: float = 1.0


@dataclass
class RolloutConfig:
    # 0: offline (fixed data, or generated once from the initial policy); 1: online; N: semi-online.
    generate_every: int = 0
    offline_source: Literal["dataset", "initial_policy"] = "dataset"
    backend: Literal["hf", "vllm"] = "hf"
    prompts_per_step: int = 8  # prompts sampled per optimizer step (a round samples N steps' worth)
    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    generation_batch_size: int = 64
    rewards: list[RewardSpec] = field(default_factory=list)
    reward_model: str | None = None  # path of a sequence-classification reward model
    reward_model_weight: float = 1.0
    pair_rule: Literal["best_worst", "all", "random"] = "best_worst"
    pair_threshold: float = 0.01
    binary_rule: Literal["pairs", "median", "mean", "value"] = "pairs"
    binary_threshold: float | None = None


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0: only at the end (if an eval set exists)
    batch_size: int = 16
    generate: bool = False  # generation-based eval (needs rewards); accuracy / mean reward / win rate
    num_prompts: int = 64
    max_new_tokens: int | None = None
    temperature: float = 0.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/humanline"
    max_steps: int = 100
    batch_size: int = 32  # examples (pairs for DPO) per optimizer step, over all processes
    micro_batch_size: int = 8  # per forward, per process
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume_from: str | None = None  # "auto" or a checkpoint path
    max_nonfinite: int = 5  # abort after this many non-finite steps in a row
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, trackio
    progress: bool = True
    save_final: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    humanline: HumanlineConfig = field(default_factory=HumanlineConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def reference_mode(self) -> str:
        if self.reference.mode != "auto":
            return self.reference.mode
        return "sync" if self.humanline.enabled else "frozen"

    @property
    def humanline_bounds(self) -> tuple[float, float] | None:
        """The clamp bounds passed to the losses, or None (normal objective or no clamp)."""
        h = self.humanline
        return (h.log_eps_P, h.log_eps_R) if h.enabled and h.clip == "clamp" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- building a dataclass from plain data, with types checked --------------------------------------

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, source: str | None) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"must be one of {', '.join(map(repr, args))}, got {value!r}",
                              source=source, key=key)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {type(value).__name__}", source=source, key=key)
        return _build(tp, value, key, source)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", source=source, key=key)
        return [_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"expected a list of {len(args)} values, got {value!r}", source=source, key=key)
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", source=source, key=key)
        return {str(k): _coerce(v, args[1], f"{key}.{k}", source) for k, v in value.items()}
    if tp is float:
        # PyYAML follows YAML 1.1, where 1e-6 (no dot) is a string: accept it as the number it means.
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", source=source, key=key)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", source=source, key=key)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", source=source, key=key)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", source=source, key=key)
        return value
    raise ConfigError(f"unsupported type {_type_name(tp)}", source=source, key=key)


def _build(cls: type, data: dict[str, Any], prefix: str, source: str | None) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown key (known: {', '.join(sorted(names))})", source=source, key=key)
        kwargs[k] = _coerce(v, hints[k], key, source)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value", source="command line")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _set_dotted(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("cannot set a key inside a non-mapping value", source="command line",
                              key=".".join(path))
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """Read a YAML recipe (optional), apply dotted ``key=value`` overrides, build and validate a Config."""
    data: dict[str, Any] = dict(base or {})
    source = str(path) if path else "config"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError("config file not found", source=source)
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"not UTF-8 text ({err.reason} at byte {err.start})", source=source) from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"line {mark.line + 1}: " if mark else ""
            problem = getattr(err, "problem", None) or "invalid YAML"
            raise ConfigError(f"{where}{problem}", source=source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError("the top level must be a mapping of sections", source=source)
        data.update(loaded)
    for text in overrides or []:
        keys, value = _parse_override(text)
        _set_dotted(data, keys, value)
    if overrides:
        source = f"{source} (with command-line overrides)"
    cfg = _build(Config, data, "", source)
    validate_config(cfg, source)
    return cfg


def config_from_dict(data: dict[str, Any], *, external_rewards: bool = False) -> Config:
    """Build and validate a Config from a nested dict (the Python API's way in).

    ``external_rewards``: the reward functions will be passed to :func:`humanline.train` as callables, so the
    config itself need not name any.
    """
    cfg = _build(Config, data, "", "config")
    validate_config(cfg, "config", external_rewards=external_rewards)
    return cfg


def validate_config(cfg: Config, source: str = "config", *, external_rewards: bool = False) -> None:
    """Range and combination checks; all before any model or data set loads."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(message, source=source, key=key)

    def positive(key: str, value: float | int | None, *, allow_zero: bool = False) -> None:
        if value is None:
            return
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    if not cfg.model.name_or_path:
        fail("model.name_or_path", "is required (a hub id or a local folder)")
    obj = cfg.loss.objective
    online = cfg.rollout.generate_every > 0 or cfg.rollout.offline_source == "initial_policy"
    if not cfg.data.train:
        fail("data.train", "is required (a file, a hub data set name, or prompts for online training)")
    positive("loss.beta", cfg.loss.beta)
    positive("loss.desirable_weight", cfg.loss.desirable_weight)
    positive("loss.undesirable_weight", cfg.loss.undesirable_weight)
    positive("loss.epsilon_low", cfg.loss.epsilon_low, allow_zero=True)
    positive("loss.epsilon_high", cfg.loss.epsilon_high, allow_zero=True)
    if cfg.loss.epsilon_low >= 1:
        fail("loss.epsilon_low", f"must be < 1 (the ratio's lower clip is 1 - epsilon_low), got {cfg.loss.epsilon_low}")
    positive("loss.kl_beta", cfg.loss.kl_beta, allow_zero=True)
    positive("loss.max_completion_length", cfg.loss.max_completion_length)
    h = cfg.humanline
    if not (math.isfinite(h.log_eps_P) and math.isfinite(h.log_eps_R)) or h.log_eps_P >= h.log_eps_R:
        fail("humanline.log_eps_P", f"must be < humanline.log_eps_R, got {h.log_eps_P} >= {h.log_eps_R}")
    if h.enabled and not (h.log_eps_P < 0 < h.log_eps_R):
        fail("humanline.log_eps_P", "the band must contain 0: log_eps_P < 0 < log_eps_R")
    positive("humanline.reject_gamma", h.reject_gamma)
    if cfg.reference.sync_every < 1:
        fail("reference.sync_every", f"must be >= 1, got {cfg.reference.sync_every}")
    if not 0 < cfg.reference.ema_alpha <= 1:
        fail("reference.ema_alpha", f"must be in (0, 1], got {cfg.reference.ema_alpha}")
    if h.enabled and cfg.reference_mode == "frozen":
        fail("reference.mode", "humanline needs a synced reference (mode sync or ema), not frozen")
    if cfg.reference.precompute and cfg.reference_mode != "frozen":
        fail("reference.precompute", "precomputed reference log-probs need a frozen reference; they cannot be "
             "combined with syncing (humanline.enabled or reference.mode sync/ema)")
    if cfg.reference.precompute and online:
        fail("reference.precompute", "precomputed reference log-probs need a fixed data set (offline training)")
    if cfg.reference.precompute and obj == "kto":
        fail("reference.precompute", "KTO cannot use precomputed reference log-probs: its KL rows pair each example "
             "with another of its micro-batch, a different pairing every step; set reference.precompute=false")
    if obj == "sft" and (h.enabled or online):
        fail("loss.objective", "sft trains on a fixed data set; humanline and rollouts do not apply")
    positive("optim.lr", cfg.optim.lr)
    positive("optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        fail("optim.betas", f"each Adam beta must be in [0, 1), got {list(cfg.optim.betas)}")
    if not 0 <= cfg.optim.warmup_ratio < 1:
        fail("optim.warmup_ratio", f"must be in [0, 1), got {cfg.optim.warmup_ratio}")
    positive("optim.max_grad_norm", cfg.optim.max_grad_norm)
    t = cfg.train
    for key in ("max_steps", "batch_size", "micro_batch_size", "log_every", "keep_last", "max_nonfinite"):
        positive(f"train.{key}", getattr(t, key))
    positive("train.save_every", t.save_every, allow_zero=True)
    if t.resume_from is not None and t.resume_from != "auto" and not Path(t.resume_from).exists():
        fail("train.resume_from", f"checkpoint not found: {t.resume_from}")
    positive("data.max_prompt_length", cfg.data.max_prompt_length)
    positive("data.max_length", cfg.data.max_length)
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        fail("data.max_prompt_length", "must be < data.max_length (room is needed for the completion)")
    positive("data.eval_size", cfg.data.eval_size, allow_zero=True)
    r = cfg.rollout
    positive("rollout.generate_every", r.generate_every, allow_zero=True)
    for key in ("prompts_per_step", "num_generations", "max_new_tokens", "generation_batch_size"):
        positive(f"rollout.{key}", getattr(r, key))
    positive("rollout.temperature", r.temperature, allow_zero=True)
    if not 0 < r.top_p <= 1:
        fail("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
    if online and obj != "sft":
        if not r.rewards and not r.reward_model and not external_rewards:
            fail("rollout.rewards", "online or generated data needs at least one reward (rewards or reward_model)")
        if r.num_generations < 2:
            fail("rollout.num_generations", "needs >= 2 samples per prompt to build pairs, labels or groups")
    if r.binary_rule == "value" and r.binary_threshold is None:
        fail("rollout.binary_threshold", "is required when rollout.binary_rule is 'value'")
    for i, spec in enumerate(r.rewards):
        if not spec.name:
            fail(f"rollout.rewards[{i}].name", "is required")
    if cfg.eval.generate and not r.rewards and not r.reward_model and not external_rewards:
        fail("eval.generate", "generation-based evaluation needs a reward (rollout.rewards or reward_model)")
    positive("eval.every", cfg.eval.every, allow_zero=True)
    positive("eval.batch_size", cfg.eval.batch_size)
    positive("eval.num_prompts", cfg.eval.num_prompts)
    if cfg.loss.loss_type == "dr_grpo" and obj == "grpo" and cfg.loss.max_completion_length is None \
            and not online:
        fail("loss.max_completion_length", "dr_grpo needs it for offline data (the fixed length denominator)")
    if cfg.lora.enabled:
        positive("lora.r", cfg.lora.r)
        positive("lora.alpha", cfg.lora.alpha)
        if not 0 <= cfg.lora.dropout < 1:
            fail("lora.dropout", f"must be in [0, 1), got {cfg.lora.dropout}")
