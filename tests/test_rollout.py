"""Rollout backends: the HF generator on a tiny Llama (grouping, EOS, padding, seeds, behaviour log-probs),
the vLLM backend's error without vllm, and the LoRA merge used to sync vLLM weights."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

from humanline.data.tokenize import encode_prompt
from humanline.errors import HumanlineError
from humanline.rollout import Generator, group_rollouts, make_generator
from humanline.rollout.hf import HFGenerator
from humanline.rollout.vllm import merged_state_dict
from humanline.tiny import build_model

PROMPTS = ["abc", [{"role": "user", "content": "What is 2+2?"}], "hello there, a longer prompt"]


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tok, hidden_size=64, num_layers=2)


@pytest.fixture(scope="module")
def eos_model(tok):
    """A tiny model that ends about half of its completions early: the EOS row of the output layer points
    along the mean final hidden state, so the EOS logit is large-ish everywhere."""
    m = build_model(tok, hidden_size=64, num_layers=2)
    ids = torch.tensor([tok("The quick brown fox jumps over 12 lazy dogs")["input_ids"]])
    with torch.no_grad():
        mean = m(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
        m.lm_head.weight[tok.eos_token_id] = 2.0 * mean / mean.norm() ** 2
    return m


def rescore(model, rollout) -> torch.Tensor:
    """Per-token log-probs of the completion from one forward pass over prompt + completion."""
    ids = torch.tensor([rollout.prompt_ids + rollout.completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(rollout.prompt_ids) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, ids[0, len(rollout.prompt_ids):, None]).squeeze(1)


def test_shapes_and_grouping(model, tok):
    gen = make_generator("hf", model, tok, max_new_tokens=8)
    assert isinstance(gen, Generator)
    rollouts = gen.generate(PROMPTS, n=2, seed=0)
    assert [r.group for r in rollouts] == [0, 0, 1, 1, 2, 2]
    assert [len(g) for g in group_rollouts(rollouts)] == [2, 2, 2]
    for r in rollouts:
        assert r.prompt == PROMPTS[r.group]
        assert r.prompt_ids == encode_prompt(tok, PROMPTS[r.group])
        assert 1 <= len(r.completion_ids) <= 8 and len(r.logps) == len(r.completion_ids)
        assert r.completion == tok.decode(r.completion_ids, skip_special_tokens=True)
        assert all(lp <= 0 for lp in r.logps)


def test_stops_on_eos_and_strips_padding(eos_model, tok):
    rollouts = HFGenerator(eos_model, tok, max_new_tokens=12).generate(["abc", "hello world"], n=8, seed=0)
    eos = tok.eos_token_id
    assert any(r.finished for r in rollouts) and any(not r.finished for r in rollouts)
    for r in rollouts:
        assert r.completion_ids.count(eos) == int(r.finished)  # nothing after the first EOS
        if r.finished:
            assert r.completion_ids[-1] == eos
        else:
            assert len(r.completion_ids) == 12
    assert any(r.finished and len(r.completion_ids) < 12 for r in rollouts)


def test_left_padding_matches_generating_alone(model, tok):
    gen = HFGenerator(model, tok, max_new_tokens=8, temperature=0.0)
    batched = gen.generate(PROMPTS, n=1)
    for prompt, together in zip(PROMPTS, batched):
        (alone,) = gen.generate([prompt], n=1)
        assert alone.completion_ids == together.completion_ids
        torch.testing.assert_close(torch.tensor(alone.logps), torch.tensor(together.logps), atol=1e-5, rtol=0)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng(model, tok):
    gen = HFGenerator(model, tok, max_new_tokens=6, batch_size=4)  # 9 rows: 3 batches share the stream
    state = torch.random.get_rng_state()
    first = [r.completion_ids for r in gen.generate(PROMPTS, n=3, seed=7)]
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [r.completion_ids for r in gen.generate(PROMPTS, n=3, seed=7)] == first
    assert [r.completion_ids for r in gen.generate(PROMPTS, n=3, seed=8)] != first
    assert len({tuple(ids) for ids in first[:3]}) > 1  # the n samples of a prompt differ
    model.generation_config.top_k = 1  # a checkpoint setting that would make sampling greedy is ignored
    try:
        assert [r.completion_ids for r in gen.generate(PROMPTS, n=3, seed=7)] == first
    finally:
        model.generation_config.top_k = None


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logps_match_a_rescoring_forward(model, tok, temperature, top_p):
    """Behaviour log-probs are the temperature-1 model's, whatever the sampling temperature / top-p."""
    gen = HFGenerator(model, tok, max_new_tokens=12, temperature=temperature, top_p=top_p)
    for r in gen.generate(PROMPTS, n=2, seed=3):
        torch.testing.assert_close(torch.tensor(r.logps), rescore(model, r), atol=1e-4, rtol=0)


def test_restores_train_mode_and_unwraps(model, tok):
    class Wrapper(torch.nn.Module):  # what DDP / accelerate look like from outside
        def __init__(self, module):
            super().__init__()
            self.module = module

    model.train()
    try:
        rollouts = HFGenerator(Wrapper(model), tok, max_new_tokens=4).generate(["abc"], n=2, seed=0)
        assert len(rollouts) == 2 and model.training
    finally:
        model.eval()
    HFGenerator(model, tok, max_new_tokens=4).generate(["abc"], seed=0)
    assert not model.training


def test_peft_model_generates_and_merges_without_mutation(tok):
    from peft import LoraConfig, get_peft_model

    base = build_model(tok, hidden_size=32, num_layers=1)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 modules_to_save=["lm_head"]))
    with torch.no_grad():  # LoRA B starts at 0: make the adapter matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.1)
    rollouts = HFGenerator(peft_model, tok, max_new_tokens=6).generate(["abc"], n=2, seed=0)
    assert len(rollouts) == 2
    for r in rollouts:
        torch.testing.assert_close(torch.tensor(r.logps), rescore(peft_model, r), atol=1e-4, rtol=0)

    before = {k: v.clone() for k, v in peft_model.state_dict().items()}
    merged = merged_state_dict(peft_model)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], atol=1e-6, rtol=0)
    after = peft_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the training model is untouched


def test_vllm_missing_gives_a_clear_message(model, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail even where it is installed
    with pytest.raises(HumanlineError, match=r"pip install 'humanline\[vllm\]'"):
        make_generator("vllm", model, tok)


def test_bad_backend_and_settings(model, tok):
    with pytest.raises(HumanlineError, match="unknown rollout backend 'sglang'"):
        make_generator("sglang", model, tok)
    with pytest.raises(HumanlineError, match="temperature"):
        HFGenerator(model, tok, temperature=-1.0)
    with pytest.raises(HumanlineError, match="n \\(samples per prompt\\)"):
        HFGenerator(model, tok).generate(["abc"], n=0)


def fake_vllm(eos: int):
    """A stand-in `vllm` module recording what the backend asks of it (the real one needs a GPU)."""
    import dataclasses
    import types
    from types import SimpleNamespace as NS

    @dataclasses.dataclass
    class EngineArgs:
        model: str = ""
        logprobs_mode: str = "raw_logprobs"

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        instances: list = []

        def __init__(self, **kwargs):
            self.kwargs, self.loaded, self.resets = kwargs, None, 0
            engine_model = NS(load_weights=lambda items: setattr(self, "loaded", dict(items)))
            runner = NS(get_model=lambda: engine_model)
            self.llm_engine = NS(model_executor=NS(driver_worker=NS(worker=NS(model_runner=runner))))
            LLM.instances.append(self)

        def reset_prefix_cache(self):
            self.resets += 1

        def generate(self, prompts, sampling_params, use_tqdm):
            self.params = sampling_params
            outputs = []
            for p, params in zip(prompts, sampling_params):
                samples = []
                for index in reversed(range(params.n)):  # out of order on purpose
                    tokens = [10, 11, eos, 12] if index == 0 else [13, 14, 15]
                    logprobs = [{t: NS(logprob=-0.1 * (k + 1))} for k, t in enumerate(tokens)]
                    samples.append(NS(index=index, token_ids=tokens, finish_reason="stop", logprobs=logprobs))
                outputs.append(NS(prompt_token_ids=p["prompt_token_ids"], outputs=samples))
            return outputs

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    engine = types.ModuleType("vllm.engine")
    arg_utils = types.ModuleType("vllm.engine.arg_utils")
    arg_utils.EngineArgs = EngineArgs
    return {"vllm": module, "vllm.engine": engine, "vllm.engine.arg_utils": arg_utils}


def test_vllm_backend_against_a_fake_engine(tiny_model_dir, tok, monkeypatch):
    from transformers import AutoModelForCausalLM

    modules = fake_vllm(tok.eos_token_id)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "")  # so that teardown restores the original
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING")
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    gen = make_generator("vllm", policy, tok, max_new_tokens=5, temperature=0.7, gpu_memory_utilization=0.2)
    llm = gen.llm
    assert llm.kwargs["model"] == tiny_model_dir and llm.kwargs["logprobs_mode"] == "raw_logprobs"
    assert llm.kwargs["gpu_memory_utilization"] == 0.2 and llm.kwargs["enable_prefix_caching"]
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert llm.loaded.keys() == policy.state_dict().keys() and llm.resets == 1  # synced at start

    rollouts = gen.generate(PROMPTS[:2], n=2, seed=5)
    assert [p.seed for p in llm.params] == [5, 7] and llm.params[0].stop_token_ids == [tok.eos_token_id]
    assert llm.params[0].logprobs == 0 and llm.params[0].temperature == 0.7 and llm.params[0].max_tokens == 5
    assert [r.group for r in rollouts] == [0, 0, 1, 1]
    first, second = rollouts[:2]
    assert first.completion_ids == [10, 11, tok.eos_token_id] and first.finished  # cut after the EOS
    assert first.logps == pytest.approx([-0.1, -0.2, -0.3])
    assert second.completion_ids == [13, 14, 15] and not second.finished
    assert first.prompt_ids == encode_prompt(tok, PROMPTS[0])
    gen.update_weights(policy)
    assert llm.resets == 2
