"""The typed config: YAML recipes, dotted overrides, types, ranges, impossible combinations, round trips.

Every bad config is a one-line ConfigError naming the file (or the command line) and the key.
"""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from humanline.config import Config, RewardSpec, config_from_dict, load_config
from humanline.errors import ConfigError, HumanlineError

BASE = ["model.name_or_path=some/model", "data.train=data.jsonl"]
ONLINE = ["rollout.generate_every=1", "rollout.rewards=[{name: exact_match}]"]


def cfg_of(*overrides: str) -> Config:
    return load_config(None, [*BASE, *overrides])


def write(tmp_path, text: str | bytes, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def config_error(*overrides: str, path: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, [*BASE, *overrides] if path is None else list(overrides))
    err = info.value
    assert "\n" not in str(err), "errors are one line"
    assert isinstance(err, HumanlineError)
    return err


# --- defaults and overrides ------------------------------------------------------------------------------

def test_defaults_match_the_dataclasses():
    cfg = cfg_of()
    assert cfg == Config(model=dataclasses.replace(Config().model, name_or_path="some/model"),
                         data=dataclasses.replace(Config().data, train="data.jsonl"))
    assert cfg.reference_mode == "frozen" and cfg.humanline_bounds is None


@pytest.mark.parametrize("override, path, expected", [
    ("optim.lr=5e-7", ("optim", "lr"), 5e-7),  # YAML 1.1 reads 5e-7 as a string: still a number here
    ("optim.lr=1.0e-6", ("optim", "lr"), 1e-6),
    ("optim.lr=2E-5", ("optim", "lr"), 2e-5),
    ("loss.beta=1", ("loss", "beta"), 1.0),  # int -> float
    ("humanline.log_eps_P=-1.5", ("humanline", "log_eps_P"), -1.5),
    ("train.max_steps=7", ("train", "max_steps"), 7),
    ("humanline.enabled=true", ("humanline", "enabled"), True),
    ("model.gguf_file=null", ("model", "gguf_file"), None),
    ("optim.max_grad_norm=null", ("optim", "max_grad_norm"), None),
    ("optim.max_grad_norm=1e1", ("optim", "max_grad_norm"), 10.0),
    ("optim.betas=[0.9, 0.95]", ("optim", "betas"), (0.9, 0.95)),  # list -> tuple
    ("train.report_to=[tensorboard, wandb]", ("train", "report_to"), ["tensorboard", "wandb"]),
    ("lora.target_modules=[q_proj, v_proj]", ("lora", "target_modules"), ["q_proj", "v_proj"]),
    ("data.columns={prompt: question, completion: answer}", ("data", "columns"),
     {"prompt": "question", "completion": "answer"}),
    ("data.columns.prompt=question", ("data", "columns"), {"prompt": "question"}),  # nested, created
    ("data.train=a=b.jsonl", ("data", "train"), "a=b.jsonl"),  # only the first '=' splits
    ("model.revision=", ("model", "revision"), ""),
    ("data.subset=[unclosed", ("data", "subset"), "[unclosed"),  # not YAML: kept as text
])
def test_typed_overrides(override, path, expected):
    cfg = cfg_of(override)
    value = getattr(getattr(cfg, path[0]), path[1])
    assert value == expected
    assert type(value) is type(expected)


def test_list_of_dataclasses_override():
    cfg = cfg_of(*ONLINE[:1], "rollout.rewards=[{name: math_verify, weight: 8}, {name: format}]")
    assert cfg.rollout.rewards == [RewardSpec("math_verify", 8.0), RewardSpec("format", 1.0)]
    assert isinstance(cfg.rollout.rewards[0].weight, float)


def test_overrides_beat_the_file_and_each_other_in_order(tmp_path):
    path = write(tmp_path, "model: {name_or_path: m}\ndata: {train: d.jsonl}\noptim: {lr: 1.0e-6, warmup_ratio: 0.2}\n")
    cfg = load_config(path, ["optim.lr=3e-6", "optim.lr=4e-6"])
    assert cfg.optim.lr == 4e-6 and cfg.optim.warmup_ratio == 0.2  # siblings of an override are kept


def test_file_sections_merge_with_defaults(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: m\ndata:\n  train: d.jsonl\nloss:\n  objective: kto\n")
    cfg = load_config(path)
    assert cfg.loss.objective == "kto" and cfg.loss.beta == 0.1 and cfg.train.batch_size == 32


def test_error_source_names_the_file_and_the_overrides(tmp_path):
    path = write(tmp_path, "model: {name_or_path: m}\ndata: {train: d.jsonl}\nloss: {beta: 0}\n")
    err = config_error(path=path)
    assert err.source == path and err.key == "loss.beta"
    assert str(err).startswith(f"{path}, key 'loss.beta': must be > 0")
    err = config_error("loss.beta=-1", path=path)
    assert err.source == f"{path} (with command-line overrides)"


# --- unknown keys and wrong types ------------------------------------------------------------------------

@pytest.mark.parametrize("override, key, words", [
    ("modle.name_or_path=x", "modle", ["unknown key", "model"]),
    ("loss.betta=0.1", "loss.betta", ["unknown key", "beta"]),
    ("humanline.log_eps=1", "humanline.log_eps", ["unknown key", "log_eps_P", "log_eps_R"]),
    ("rollout.rewards=[{nme: format}]", "rollout.rewards[0].nme", ["unknown key", "name"]),
    ("train.max_steps=1.5", "train.max_steps", ["expected an integer"]),
    ("train.max_steps=true", "train.max_steps", ["expected an integer"]),  # a bool is not an int
    ("train.max_steps=many", "train.max_steps", ["expected an integer", "'many'"]),
    ("optim.lr=fast", "optim.lr", ["expected a number", "'fast'"]),
    ("optim.lr=true", "optim.lr", ["expected a number"]),
    ("humanline.enabled=maybe", "humanline.enabled", ["expected true or false"]),
    ("model.name_or_path=123", "model.name_or_path", ["expected a string"]),
    ("loss.objective=ppo", "loss.objective", ["must be one of", "'dpo'", "'ppo'"]),
    ("humanline.clip=mask", "humanline.clip", ["must be one of", "'clamp'"]),
    ("optim.betas=[0.9]", "optim.betas", ["list of 2 values"]),
    ("train.report_to=wandb", "train.report_to", ["expected a list"]),
    ("data.columns=prompt", "data.columns", ["expected a mapping"]),
    ("model=hub/id", "model", ["expected a mapping"]),
    ("rollout.rewards=[format]", "rollout.rewards[0]", ["expected a mapping"]),
    ("model.name_or_path.sub=1", "model.name_or_path.sub", ["non-mapping"]),
])
def test_unknown_keys_and_wrong_types(override, key, words):
    err = config_error(override)
    assert err.key == key
    for word in words:
        assert word in str(err)


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = write(tmp_path, "model: {name_or_path: m}\ndata: {train: d.jsonl}\ntrain: {max_step: 3}\n")
    err = config_error(path=path)
    assert err.source == path and err.key == "train.max_step" and "max_steps" in str(err)


def test_override_without_equals_names_the_command_line():
    err = config_error("optim.lr")
    assert err.source == "command line" and "key=value" in str(err)


# --- out-of-range values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["loss.beta=0"], "loss.beta"),
    (["loss.beta=-0.1"], "loss.beta"),
    (["loss.beta=.nan"], "loss.beta"),
    (["loss.beta=.inf"], "loss.beta"),
    (["loss.desirable_weight=0"], "loss.desirable_weight"),
    (["loss.undesirable_weight=-1"], "loss.undesirable_weight"),
    (["loss.epsilon_low=1"], "loss.epsilon_low"),
    (["loss.epsilon_high=-0.1"], "loss.epsilon_high"),
    (["loss.kl_beta=-1e-4"], "loss.kl_beta"),
    (["loss.max_completion_length=0"], "loss.max_completion_length"),
    (["humanline.log_eps_P=1.5"], "humanline.log_eps_P"),  # == log_eps_R
    (["humanline.log_eps_P=2", "humanline.log_eps_R=1"], "humanline.log_eps_P"),
    (["humanline.log_eps_P=-.inf"], "humanline.log_eps_P"),
    (["humanline.enabled=true", "humanline.log_eps_P=0.1", "humanline.log_eps_R=1"], "humanline.log_eps_P"),
    (["humanline.enabled=true", "humanline.log_eps_P=-1", "humanline.log_eps_R=0"], "humanline.log_eps_P"),
    (["humanline.reject_gamma=0"], "humanline.reject_gamma"),
    (["reference.sync_every=0"], "reference.sync_every"),
    (["reference.sync_every=-3"], "reference.sync_every"),
    (["reference.ema_alpha=0"], "reference.ema_alpha"),
    (["reference.ema_alpha=1.5"], "reference.ema_alpha"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-6"], "optim.lr"),
    (["optim.weight_decay=-0.1"], "optim.weight_decay"),
    (["optim.betas=[1.0, 0.999]"], "optim.betas"),
    (["optim.betas=[0.9, -0.1]"], "optim.betas"),
    (["optim.warmup_ratio=1"], "optim.warmup_ratio"),
    (["optim.warmup_ratio=1.5"], "optim.warmup_ratio"),
    (["optim.warmup_ratio=-0.1"], "optim.warmup_ratio"),
    (["optim.max_grad_norm=0"], "optim.max_grad_norm"),
    (["train.max_steps=0"], "train.max_steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.micro_batch_size=-1"], "train.micro_batch_size"),
    (["train.log_every=0"], "train.log_every"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.max_nonfinite=0"], "train.max_nonfinite"),
    (["train.save_every=-1"], "train.save_every"),
    (["data.max_length=0"], "data.max_length"),
    (["data.max_prompt_length=1024"], "data.max_prompt_length"),  # == max_length: no room for a reply
    (["data.max_prompt_length=2000", "data.max_length=1000"], "data.max_prompt_length"),
    (["data.eval_size=-0.5"], "data.eval_size"),
    (["rollout.generate_every=-1"], "rollout.generate_every"),
    (["rollout.num_generations=0"], "rollout.num_generations"),
    (["rollout.prompts_per_step=0"], "rollout.prompts_per_step"),
    (["rollout.max_new_tokens=0"], "rollout.max_new_tokens"),
    (["rollout.temperature=-1"], "rollout.temperature"),
    (["rollout.top_p=0"], "rollout.top_p"),
    (["rollout.top_p=1.5"], "rollout.top_p"),
    (["rollout.rewards=[{name: ''}]"], "rollout.rewards[0].name"),
    (["rollout.binary_rule=value"], "rollout.binary_threshold"),
    (["eval.batch_size=0"], "eval.batch_size"),
    (["eval.every=-1"], "eval.every"),
    (["lora.enabled=true", "lora.r=0"], "lora.r"),
    (["lora.enabled=true", "lora.dropout=1"], "lora.dropout"),
    (["model.name_or_path="], "model.name_or_path"),
    (["data.train="], "data.train"),
    (["train.resume_from=/no/such/checkpoint"], "train.resume_from"),
])
def test_out_of_range_values(overrides, key):
    assert config_error(*overrides).key == key


def test_boundaries_that_are_allowed():
    cfg = cfg_of("loss.kl_beta=0", "loss.epsilon_low=0", "optim.warmup_ratio=0", "train.save_every=0",
                 "rollout.temperature=0", "rollout.top_p=1", "reference.ema_alpha=1", "optim.betas=[0, 0]",
                 "humanline.log_eps_P=0.5", "humanline.log_eps_R=1")  # disabled: the band need not hold 0
    assert cfg.loss.kl_beta == 0 and not cfg.humanline.enabled
    assert cfg_of("lora.r=0").lora.r == 0  # LoRA settings are only checked when LoRA is on
    assert cfg_of("train.resume_from=auto").train.resume_from == "auto"


# --- impossible combinations -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, key, words", [
    (["reference.precompute=true", "humanline.enabled=true"], "reference.precompute", ["frozen", "syncing"]),
    (["reference.precompute=true", "reference.mode=sync"], "reference.precompute", ["frozen"]),
    (["reference.precompute=true", "reference.mode=ema"], "reference.precompute", ["frozen"]),
    (["reference.precompute=true", *ONLINE], "reference.precompute", ["fixed data set"]),
    (["humanline.enabled=true", "reference.mode=frozen"], "reference.mode", ["synced"]),
    (["loss.objective=sft", "humanline.enabled=true"], "loss.objective", ["sft", "humanline"]),
    (["loss.objective=sft", *ONLINE], "loss.objective", ["sft"]),
    (["rollout.generate_every=1"], "rollout.rewards", ["reward"]),
    (["rollout.offline_source=initial_policy"], "rollout.rewards", ["reward"]),
    ([*ONLINE, "rollout.num_generations=1"], "rollout.num_generations", [">= 2"]),
    (["loss.objective=grpo", "loss.loss_type=dr_grpo"], "loss.max_completion_length", ["dr_grpo"]),
    (["eval.generate=true"], "eval.generate", ["reward"]),
])
def test_impossible_combinations(overrides, key, words):
    err = config_error(*overrides)
    assert err.key == key
    for word in words:
        assert word in str(err)


def test_possible_combinations():
    assert cfg_of("humanline.enabled=true").reference_mode == "sync"
    assert cfg_of("humanline.enabled=true", "reference.mode=ema").reference_mode == "ema"
    assert cfg_of("reference.precompute=true").reference.precompute
    assert cfg_of("loss.objective=grpo", "loss.loss_type=dr_grpo", "loss.max_completion_length=256")
    assert cfg_of("loss.objective=grpo", "loss.loss_type=dr_grpo", *ONLINE)  # online: max_new_tokens
    assert cfg_of("loss.objective=grpo", "rollout.generate_every=4", "rollout.reward_model=rm/id")
    assert cfg_of("loss.objective=sft", "reference.precompute=true")  # harmless: sft has no reference
    assert cfg_of("humanline.enabled=true", "humanline.clip=none").humanline_bounds is None
    assert cfg_of("humanline.enabled=true", "humanline.clip=reject").humanline_bounds is None
    assert cfg_of("humanline.enabled=true", "humanline.log_eps_P=-0.1",
                  "humanline.log_eps_R=1.0").humanline_bounds == (-0.1, 1.0)


# --- bad YAML files --------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: m\ndata:\n  train: d.jsonl\n  eval: [a, b\nloss:\n  beta: 0.1\n")
    err = config_error(path=path)
    assert err.source == path and "line 6" in str(err), str(err)


def test_yaml_bad_indentation_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: m\n data:\n  train: d.jsonl\n")
    err = config_error(path=path)
    assert err.source == path and "line 3" in str(err), str(err)


def test_yaml_tab_names_the_line(tmp_path):
    path = write(tmp_path, "model:\n  name_or_path: m\ndata:\n\ttrain: d.jsonl\n")
    err = config_error(path=path)
    assert err.source == path and "line 4" in str(err) and "tab" in str(err), str(err)


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(tmp_path, text):
    err = config_error(path=write(tmp_path, text))
    assert "top level must be a mapping" in str(err)


def test_section_that_is_not_a_mapping(tmp_path):
    err = config_error(path=write(tmp_path, "model: meta-llama/Meta-Llama-3-8B-Instruct\n"))
    assert err.key == "model" and "expected a mapping" in str(err)


def test_empty_file_falls_back_to_defaults_then_asks_for_the_model(tmp_path):
    err = config_error(path=write(tmp_path, "# nothing yet\n"))
    assert err.key == "model.name_or_path" and "required" in str(err)


def test_missing_and_non_utf8_files(tmp_path):
    err = config_error(path=str(tmp_path / "nope.yaml"))
    assert "not found" in str(err) and err.source.endswith("nope.yaml")
    err = config_error(path=write(tmp_path, b"model: {name_or_path: caf\xe9}\n"))
    assert "UTF-8" in str(err)


# --- round trips -----------------------------------------------------------------------------------------

def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = cfg_of("humanline.enabled=true", "reference.sync_every=4", "optim.betas=[0.9, 0.95]", *ONLINE,
                 "rollout.rewards=[{name: math_verify, weight: 8}, {name: format}]", "data.columns.prompt=q",
                 "train.report_to=[tensorboard]", "lora.target_modules=[q_proj]", "optim.max_grad_norm=null")
    path = write(tmp_path, yaml.safe_dump(cfg.to_dict(), sort_keys=False), "resolved.yaml")
    again = load_config(path)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_config_from_dict_validates():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"name_or_path": "m"}, "data": {"train": "d"}, "optim": {"lr": 0}})
    assert info.value.key == "optim.lr" and info.value.source == "config"
