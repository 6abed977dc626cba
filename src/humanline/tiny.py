"""Tiny models built locally: a character tokenizer with a chat template and a small Llama.

Used by the arena, the tests and the benchmarks so that nothing is downloaded. The tokenizer is a
plain ``PreTrainedTokenizerFast`` and the model a ``LlamaForCausalLM``: both round-trip through
``save_pretrained`` / ``from_pretrained`` like any hub checkpoint.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# BOS comes from the template only (the tokenizer adds no special tokens itself), so a templated
# prompt never gets a second BOS. Every turn ends with EOS, which is what generation stops on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

DEFAULT_CHARS = string.digits + string.ascii_letters + string.punctuation + " \n"


def build_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``chars`` with pad/bos/eos/unk, role tokens and a chat template."""
    specials = [PAD, BOS, EOS, UNK, *ROLE_TOKENS]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(chars):  # keeps order, drops repeats
        vocab.setdefault(ch, len(vocab))
    # BPE without merges splits every word into characters: a char-level model in one line.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.add_special_tokens(specials)
    core.decoder = decoders.Fuse()  # characters join without spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS), clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok


def build_model(tokenizer: PreTrainedTokenizerFast, *, hidden_size: int = 128, num_layers: int = 4,
                intermediate_size: int | None = None, num_heads: int = 4, max_positions: int = 512,
                seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised Llama sized for CPU work (hidden 128 x 4 layers is about 1M parameters)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=intermediate_size or 4 * hidden_size, num_attention_heads=num_heads,
        num_key_value_heads=num_heads, max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(path: str, *, seed: int = 0, **model_kwargs: int) -> str:
    """Build a tiny tokenizer + model and save both to ``path`` (a folder any loader accepts)."""
    tok = build_tokenizer()
    model = build_model(tok, seed=seed, **model_kwargs)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
