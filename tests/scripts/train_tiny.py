"""Train a tiny model on a synthetic task; used by tests that need a separate process.

python tests/scripts/train_tiny.py OUT_DIR OBJECTIVE [key=value config overrides...]
Env: HUMANLINE_TEST_STEP_DELAY (seconds to sleep per step, so a test can kill the run mid-way).
The final parameters are written to OUT_DIR/params.safetensors.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_rows  # noqa: E402

from humanline.config import load_config  # noqa: E402
from humanline.run import prepare_offline  # noqa: E402
from humanline.tiny import build_model, build_tokenizer  # noqa: E402
from humanline.trainer import DatasetSource, Trainer  # noqa: E402


def main() -> None:
    out, objective, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    base = {"model": {"name_or_path": "tiny"}, "data": {"train": "rows", "max_length": 48, "max_prompt_length": 16},
            "loss": {"objective": objective}, "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
            "train": {"max_steps": 3, "batch_size": 8, "micro_batch_size": 4, "output_dir": out,
                      "progress": False, "save_final": False}}
    cfg = load_config(None, overrides, base=base)
    tok = build_tokenizer()
    model = build_model(tok, hidden_size=32, num_layers=2, seed=0)
    train_ex, _, _ = prepare_offline(cfg, tok, tiny_rows(objective, 32))
    source = DatasetSource(train_ex, cfg.train.batch_size, cfg.train.seed)
    delay = float(os.environ.get("HUMANLINE_TEST_STEP_DELAY", "0"))
    if delay:
        inner = source.examples_for_step

        def slow(step: int) -> list:
            time.sleep(delay)
            return inner(step)

        source.examples_for_step = slow  # type: ignore[method-assign]
    trainer = Trainer(cfg, model, tok, source)
    trainer.train()
    if trainer.acc.is_main_process:
        state = {k: v.detach().contiguous() for k, v in trainer.unwrapped.state_dict().items()}
        save_file(state, os.path.join(out, "params.safetensors"))


if __name__ == "__main__":
    main()
