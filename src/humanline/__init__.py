"""humanline: post-train language models with the humanline alignment method.

DPO, KTO and GRPO (and SFT), each normal or humanline (a synced, lagging reference plus per-token log-ratio
clipping), offline, online or semi-online, in one training loop. See README.md and docs/DESIGN.md.

The public names below are imported lazily, so ``import humanline`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # losses: pure functions of per-token log-probs
    "LossOutput": "losses", "humanline_clip": "losses", "unclamped_fraction": "losses",
    "humanline_reject_mask": "losses", "dpo_loss": "losses", "kto_loss": "losses", "grpo_loss": "losses",
    "group_advantages": "losses", "sft_loss": "losses",
    "token_logprobs": "logprobs", "sequence_logprobs": "logprobs",
    # configuration and training
    "Config": "config", "load_config": "config", "config_from_dict": "config",
    "Trainer": "trainer", "TrainResult": "trainer", "DatasetSource": "trainer",
    "Reference": "reference",
    "train": "run", "validate": "run", "load_policy": "run", "prepare_offline": "run",
    # models and data
    "load_model": "models", "load_tokenizer": "models", "apply_lora": "models", "save_model": "models",
    "load_trained": "models",
    "load_rows": "data", "to_objective_rows": "data", "tokenize_dataset": "data", "collate": "data",
    "prepare": "data",
    # rollouts, rewards, feedback
    "Rollout": "rollout", "HFGenerator": "rollout.hf", "make_generator": "rollout",
    "load_reward": "rewards", "RewardSet": "rewards", "RewardModelScorer": "rewards",
    "exact_match_reward": "rewards", "format_reward": "rewards", "math_verify_reward": "rewards",
    "extract_answer": "rewards",
    "to_pairs": "feedback", "to_binary": "feedback", "to_groups": "feedback",
    # errors
    "HumanlineError": "errors", "DataError": "errors", "ConfigError": "errors", "RewardError": "errors",
}

__all__ = sorted(_EXPORTS) + ["theory", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "theory":
        return importlib.import_module(".theory", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'humanline' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
