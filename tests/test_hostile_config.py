"""Hostile settings: every numeric setting of every notebook given NaN, infinities, zero, negatives, huge numbers and
wrong types; run names that would leave STACK_HOME; unknown choices; an unwritable STACK_HOME. Each is refused with
a ConfigError that names the setting and the value."""
import ast
import dataclasses
import math
import os
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import stackcore as sc
from data.gsm8k import TaskPrompt
from notebooks.config import (PRESET_NAMES, Allowed, StackConfig, above, accumulation_steps, configure, layer_list,
                              parse_value)
from notebooks.rl import prompts_that_fit
from notebooks.sft import evaluate_sft_loss
from notebooks.training import validation_steps

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOK_NAMES = ("01_tokenizer", "02_sharding", "03_pretrain", "04_core_eval", "05_sft", "06_rl", "07_chat")


def notebook_config(name: str) -> type:
    """The config dataclass of a notebook, built from its imports and class definition without running its cells."""
    tree = ast.parse((NOTEBOOKS / f"{name}.py").read_text())
    keep = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
            or (isinstance(node, ast.ClassDef) and node.name.endswith("Config"))]
    namespace = {"sc": sc, "dataclass": dataclass}
    exec(compile(ast.Module(body=keep, type_ignores=[]), f"{name}.py", "exec"), namespace)
    return next(value for node in keep if isinstance(node, ast.ClassDef) for value in [namespace[node.name]])


CONFIGS = {name: notebook_config(name) for name in NOTEBOOK_NAMES}


def numeric_fields(cls: type) -> list[tuple[str, type]]:
    kinds = typing.get_type_hints(cls)
    return [(f.name, kinds[f.name]) for f in dataclasses.fields(cls) if kinds[f.name] in (int, float)]


def hostile_numbers(kind: type, allowed: Allowed) -> list[str]:
    """Values a setting must refuse: non-numbers always; NaN, infinities and 1e30 for floats (1e30 only where a
    bound exists); for ints anything beyond int64 or not an integer; 0 and negatives where the range excludes them."""
    values = ["abc", "1.5e", "[]"]
    values += ["nan", "inf", "-inf"] + (["1e30"] if allowed.high < 1e30 else []) if kind is float else ["1e30", "0.5"]
    values += [raw for raw in ("0", "-1", "-1e9") if not allowed.admits(float(raw))]
    return values


CASES = [pytest.param(name, field, raw, id=f"{name}-{field}={raw}")
         for name, cls in CONFIGS.items() for field, kind in numeric_fields(cls)
         for raw in hostile_numbers(kind, cls.limits()[field])]


@pytest.mark.parametrize("name, field, raw", CASES)
def test_hostile_number_is_refused_naming_setting_and_value(name, field, raw):
    with pytest.raises(sc.ConfigError) as error:
        configure(CONFIGS[name], [f"--{field}={raw}"], {})
    message = str(error.value)
    kind = typing.get_type_hints(CONFIGS[name])[field]
    try:
        shown = repr(parse_value(field, raw, kind))  # a parsed value is shown as parsed (1e30 as an integer)
    except sc.ConfigError:
        shown = repr(raw)
    assert f"{field}" in message and shown in message, message


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_every_numeric_setting_declares_its_range(name):
    cls = CONFIGS[name]
    assert [field for field, _ in numeric_fields(cls) if field not in cls.limits()] == []


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_every_preset_passes_its_own_limits(name, preset):
    config = configure(CONFIGS[name], [f"--preset={preset}"], {})
    assert config.preset == preset


def test_range_error_says_what_is_allowed():
    with pytest.raises(sc.ConfigError, match=r"save_every=0: save_every must be > 0"):
        configure(CONFIGS["03_pretrain"], ["--save_every=0"], {})
    with pytest.raises(sc.ConfigError, match=r"lr_scale=nan: lr_scale must be a finite number > 0"):
        configure(CONFIGS["03_pretrain"], ["--lr_scale=nan"], {})
    with pytest.raises(sc.ConfigError, match=r"cooldown_frac=1.5: cooldown_frac must be >= 0 and <= 1"):
        configure(CONFIGS["05_sft"], ["--cooldown_frac=1.5"], {})
    with pytest.raises(sc.ConfigError, match=r"depth=1\d{30}: depth must be at most 9223372036854775807"):
        configure(CONFIGS["03_pretrain"], ["--depth=1e30"], {})


def test_environment_values_are_validated_too():
    with pytest.raises(sc.ConfigError, match=r"steps=-5: steps must be > 0"):
        configure(CONFIGS["06_rl"], [], {"STACK_STEPS": "-5"})


RUN_NAME_FIELDS = [(name, field) for name, cls in CONFIGS.items() for field, allowed in cls.limits().items()
                   if allowed.folder]
ESCAPES = ("../../x", "..", ".", "/tmp/x", "a/b", "a\\b", "~/x", " x", "x\n", "-rf", "")


@pytest.mark.parametrize("name, field", RUN_NAME_FIELDS)
@pytest.mark.parametrize("raw", ESCAPES)
def test_run_names_stay_inside_stack_home(name, field, raw):
    allowed = CONFIGS[name].limits()[field]
    if raw == "" and allowed.optional:
        assert configure(CONFIGS[name], [f"--{field}="], {}).__dict__[field] == ""
        return
    with pytest.raises(sc.ConfigError, match="nothing that leaves STACK_HOME") as error:
        configure(CONFIGS[name], [f"--{field}={raw}"], {})
    assert f"{field}={raw!r}" in str(error.value)


@pytest.mark.parametrize("raw", ["pretrain", "run-2", "depth_20.b"])
def test_plain_run_names_are_accepted(raw):
    assert configure(CONFIGS["03_pretrain"], [f"--run_name={raw}"], {}).run_name == raw


CHOICE_FIELDS = [(name, field, allowed) for name, cls in CONFIGS.items() for field, allowed in cls.limits().items()
                 if allowed.choices]


@pytest.mark.parametrize("name, field, allowed", CHOICE_FIELDS)
def test_unknown_choices_are_refused_with_the_valid_ones(name, field, allowed):
    with pytest.raises(sc.ConfigError) as error:
        configure(CONFIGS[name], [f"--{field}=fastest"], {})
    assert f"{field}='fastest'" in str(error.value) and all(choice in str(error.value) for choice in allowed.choices)


def test_limits_naming_a_missing_setting_are_a_mistake():
    @dataclass
    class Broken(StackConfig):
        steps: int = 1
        LIMITS = {"step": above(0)}

    with pytest.raises(sc.ConfigError, match="Broken.LIMITS names settings it does not have: step"):
        configure(Broken, [], {})


def test_values_of_the_wrong_type_are_refused_in_code_too():
    config = CONFIGS["03_pretrain"]()
    for field, value in (("depth", True), ("depth", 2.5), ("lr_scale", "1"), ("run_name", 3), ("compile", 1)):
        bad = dataclasses.replace(config, **{field: value})
        with pytest.raises(sc.ConfigError, match=f"{field}=.*must be of type"):
            bad.validate()


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_in_code(value):
    with pytest.raises(sc.ConfigError, match="must be a finite number"):
        dataclasses.replace(CONFIGS["06_rl"](), temperature=value).validate()


def test_unwritable_stack_home_is_one_line_naming_the_path(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("STACK_HOME", str(blocker / "home"))
    with pytest.raises(sc.ConfigError) as error:
        sc.artifact_dir("runs")
    message = str(error.value)
    assert "\n" not in message and str(blocker / "home") in message and "not writable" in message


def test_a_layer_list_setting_names_itself_when_it_is_not_numbers():
    assert layer_list("paired_heads", " 0, 2,,9 ") == (0, 2, 9) and layer_list("paired_heads", "") == ()
    with pytest.raises(sc.ConfigError, match=r"bad value '0,two' for paired_heads: expected layer numbers"):
        layer_list("paired_heads", "0,two")


@pytest.mark.parametrize("name", ["03_pretrain", "05_sft"])
def test_the_tiny_preset_splits_over_two_cpu_ranks(name):
    """Tutorial 02 runs the tiny preset under torchrun with two processes: its batch must divide between them."""
    cfg = configure(CONFIGS[name], ["--preset=tiny"], {})
    assert accumulation_steps(cfg.tokens_per_step, cfg.micro_tokens, 2) >= 1


@pytest.mark.parametrize("name, args, refusal", [
    ("03_pretrain", ["--steps=4", "--warmup_steps=1000"], r"warmup_steps=1000 runs past the start of the cool-down at "
     r"step 2.4 \(steps=4, cooldown_frac=0.4\)"),
    ("03_pretrain", ["--steps=10", "--warmup_steps=6", "--cooldown_frac=0.5"], r"warmup_steps=6 runs past .* step 5 "),
    ("03_pretrain", ["--steps=3", "--batch_start_tokens=2048", "--batch_ramp_steps=1000", "--preset=tiny"],
     r"batch_ramp_steps=1000 is more than steps=3: the batch would never reach tokens_per_step \(4096\)"),
    ("06_rl", ["--samples_per_prompt=1"], r"samples_per_prompt=1: an answer alone is its own group's baseline"),
    ("06_rl", ["--temperature=0"], r"temperature=0 with top_k=0 samples the same answer every time"),
    ("06_rl", ["--top_k=1"], r"temperature=1 with top_k=1 samples the same answer every time"),
], ids=["warmup_past_steps", "warmup_into_cooldown", "batch_ramp_past_steps", "rl_group_of_one", "rl_greedy",
        "rl_top_k_1"])
def test_settings_that_contradict_each_other_are_refused(name, args, refusal):
    """Each setting is valid alone; together they make a run that trains at a fraction of its learning rate, never
    reaches its batch, or (RL) samples groups whose advantages are all zero, so that no step learns anything."""
    with pytest.raises(sc.ConfigError, match=refusal):
        configure(CONFIGS[name], args, {})


@pytest.mark.parametrize("args", [["--steps=10", "--warmup_steps=6"], ["--steps=10", "--batch_start_tokens=2048",
                                  "--batch_ramp_steps=10", "--preset=tiny"], ["--cooldown_frac=1"]])
def test_a_warmup_and_ramp_that_fit_the_run_are_accepted(args):
    configure(CONFIGS["03_pretrain"], args, {})


def test_rl_answers_longer_than_the_context_name_max_new_tokens():
    """A --max_new_tokens that leaves no question room in the model's context used to end 06_rl with a traceback
    ('no prompts to sample from') that named neither the setting nor the context."""
    prompts = [TaskPrompt(ids=[1] * length, gold="4", problem=index) for index, length in enumerate((40, 30, 50))]
    assert [len(p.ids) for p in prompts_that_fit(prompts, 256, 216, "train")] == [40, 30]
    refusal = (r"max_new_tokens=250 leaves no test question room in the model's context of 256 tokens \(the shortest "
               r"prompt has 30\): pass --max_new_tokens=226")
    with pytest.raises(sc.ConfigError, match=refusal):
        prompts_that_fit(prompts, 256, 250, "test")


def test_a_huge_eval_tokens_scores_the_validation_split_once(tmp_path):
    """--eval_tokens far beyond the validation split (a typo, or the speedrun's value on a small split) made every
    bits-per-byte measurement of 03_pretrain and 04_core_eval walk the split over and over, for hours."""

    sc.write_shard(tmp_path / "val_000000.bin", np.r_[511, np.arange(1, 1000) % 500], vocab_size=512)
    loader = sc.PretrainLoader(tmp_path, "val", tokens=100, bos_id=511, vocab_size=512, max_doc_len=64)
    assert validation_steps(10**12, loader, world_size=1) == 10 and validation_steps(10**12, loader, 2) == 5
    assert validation_steps(300, loader, world_size=1) == 3 and validation_steps(1, loader, world_size=1) == 1


def test_a_huge_eval_steps_scores_the_sft_validation_split_once(tmp_path):
    """--eval_steps beyond the conversations of the validation split made 05_sft's every measurement score them over
    and over (with --eval_steps=100000 the tiny run never ended)."""

    ids = np.concatenate([np.r_[511, np.arange(1, 20 + i)] for i in range(6)])
    path = sc.write_shard(tmp_path / "val_000000.bin", ids, vocab_size=512)
    sc.write_shard(sc.side_file(path, "mask"), np.arange(len(ids)) % 2, "mask")
    loader = sc.SFTLoader(tmp_path, "val", tokens=64, bos_id=511, vocab_size=512, max_seq_len=32, shuffle=False)
    batches = []
    next_batch = loader.next_batch
    loader.next_batch = lambda: batches.append(next_batch()) or batches[-1]
    model = sc.GPT(sc.GPTConfig(vocab_size=512, depth=1, model_dim=32, head_dim=16, max_seq_len=32))
    loss = evaluate_sft_loss(model, loader, 10_000, "sdpa")
    assert math.isfinite(loss) and sum(len(batch.cu_seqlens) - 1 for batch in batches) == 6, len(batches)


@pytest.mark.parametrize("raw", ["9223372036854775807", "12345678901234567", "9007199254740993"])
def test_large_integer_settings_are_read_exactly(raw):
    """Integers were read through a float: --seed=9223372036854775807 (the largest allowed) was refused as
    9223372036854775808, and a seed above 2**53 silently became a neighbour."""
    assert configure(CONFIGS["07_chat"], [f"--seed={raw}"], {}).seed == int(raw)
    assert configure(CONFIGS["03_pretrain"], [], {"STACK_SEED": raw}).seed == int(raw)


def test_an_integer_one_past_int64_is_refused_as_given():
    with pytest.raises(sc.ConfigError, match=r"seed=9223372036854775808: seed must be at most 9223372036854775807"):
        configure(CONFIGS["06_rl"], ["--seed=9223372036854775808"], {})


@pytest.mark.parametrize("name", ["01_tokenizer", "07_chat"])
def test_a_twin_run_from_another_folder_finds_its_checkout(tmp_path, name):
    """`python /path/to/notebooks/NN.py` from any other folder took that folder for a fresh Colab runtime and ran
    `git clone` into /content/decoderstack (without a network, a CalledProcessError) instead of running the checkout's
    own code."""
    env = {**os.environ, "STACK_HOME": str(tmp_path / "home"), "STACK_PRESET": "tiny", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(NOTEBOOKS / f"{name}.py"), "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage: python" in result.stdout, result.stderr[-2000:]
