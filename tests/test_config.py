import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import stackcore as sc
from notebooks.config import StackConfig, configure, parse_cli_overrides, reading_settings, usage
from notebooks.runtime import end_scripts_on_user_errors


@dataclass
class DemoConfig(StackConfig):
    steps: int = 100
    lr: float = 0.1
    name: str = "run"
    compile: bool = True
    PRESETS = {"tiny": dict(steps=5), "speedrun": dict(steps=1000, lr=0.2)}


@dataclass
class ChildConfig(DemoConfig):
    extra: int = 1
    PRESETS = {"tiny": dict(extra=7)}


def test_defaults_then_preset_then_env_then_cli():
    cfg = configure(DemoConfig, [], {"STACK_PRESET": "tiny"})
    assert (cfg.preset, cfg.steps, cfg.lr) == ("tiny", 5, 0.1)
    cfg = configure(DemoConfig, [], {"STACK_PRESET": "tiny", "STACK_STEPS": "9"})
    assert cfg.steps == 9
    cfg = configure(DemoConfig, ["--steps=11", "--lr", "3e-4", "--no-op-flag"][:3], {"STACK_STEPS": "9"})
    assert (cfg.steps, cfg.lr) == (11, 3e-4)


def test_cli_preset_wins_over_env_and_parent_presets_apply():
    cfg = configure(ChildConfig, ["--preset=speedrun"], {"STACK_PRESET": "tiny"})
    assert (cfg.preset, cfg.steps, cfg.extra) == ("speedrun", 1000, 1)
    cfg = configure(ChildConfig, ["--preset=tiny"], {})
    assert (cfg.steps, cfg.extra) == (5, 7)


@pytest.mark.parametrize("argv, value", [(["--compile=false"], False), (["--compile"], True), (["--compile=0"], False)])
def test_bool_values(argv, value):
    assert configure(DemoConfig, argv, {"STACK_PRESET": "tiny"}).compile is value


def test_integer_spellings():
    assert configure(DemoConfig, ["--steps=524_288"], {"STACK_PRESET": "tiny"}).steps == 524288
    assert configure(DemoConfig, ["--steps=5e3"], {"STACK_PRESET": "tiny"}).steps == 5000


def test_unknown_key_lists_valid_keys():
    with pytest.raises(sc.ConfigError, match=r"--stpes.*valid keys: steps, lr, name, compile"):
        configure(DemoConfig, ["--stpes=3"], {"STACK_PRESET": "tiny"})


@pytest.mark.parametrize("argv", [["--steps=many"], ["--steps=2.5"], ["--lr=fast"], ["--compile=maybe"]])
def test_bad_value_names_field_and_type(argv):
    with pytest.raises(sc.ConfigError, match=argv[0][2:].split("=")[0]):
        configure(DemoConfig, argv, {"STACK_PRESET": "tiny"})


def test_unknown_preset_and_stray_argument():
    with pytest.raises(sc.ConfigError, match="valid presets: tiny, colab, speedrun, node"):
        configure(DemoConfig, ["--preset=huge"], {})
    with pytest.raises(sc.ConfigError, match="unexpected argument"):
        configure(DemoConfig, ["steps=3"], {"STACK_PRESET": "tiny"})


@pytest.mark.parametrize("gpu, preset", [
    (None, "tiny"), (sc.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 85.0), "speedrun"),
    (sc.GpuInfo("Tesla T4", (7, 5), 15.8), "colab"),
], ids=["cpu", "h100", "t4"])
def test_auto_preset_follows_the_gpu_probe(monkeypatch, gpu, preset):
    """The probe is faked, so the test means the same on a machine with a GPU as on one without."""
    monkeypatch.setattr("notebooks.config.current_gpu", lambda device="cuda": gpu)
    assert configure(DemoConfig, [], {}).preset == preset


def test_artifacts_live_under_stack_home(stack_home):
    assert sc.artifact_dir("shards") == stack_home / "shards" and (stack_home / "shards").is_dir()
    with pytest.raises(ValueError, match="unknown artifact kind"):
        sc.artifact_dir("weights")
    with pytest.raises(sc.MissingArtifactError, match=r"run notebooks/01_tokenizer first"):
        sc.require_artifact(stack_home / "tokenizer" / "tokenizer.json", made_by="01_tokenizer")


# ----- a twin's command line: --help, a bad option, misspelt STACK_ variables


TWINS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.py"))


def run_twin(twin, *args, **environ):
    env = {**os.environ, "STACK_PRESET": "tiny", **environ}
    return subprocess.run([sys.executable, str(twin), *args], cwd=twin.parents[1], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("twin", TWINS, ids=lambda path: path.stem)
def test_help_lists_every_option_with_its_default_and_exits_0(twin):
    result = run_twin(twin, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python" in result.stdout and "Defaults of the tiny preset:" in result.stdout
    options = re.findall(r"^  --(\w+) +(\S.*)$", result.stdout.split("usage: python")[1], re.M)
    assert len(options) >= 3 and len({name for name, _ in options}) == len(options), result.stdout
    assert "Traceback" not in result.stderr


def test_short_h_is_help_too():
    """The set-up cell reads the preset from the command line before configure: it must let -h through."""
    result = run_twin(TWINS[0], "-h")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: python" in result.stdout and "unexpected argument" not in result.stderr


def test_parse_cli_overrides_leaves_the_help_flags_to_configure():
    assert parse_cli_overrides(["-h", "--steps=3", "--help"]) == {"steps": "3"}


@pytest.mark.parametrize("twin", TWINS, ids=lambda path: path.stem)
def test_a_bad_option_is_one_line_and_exit_status_2(twin):
    result = run_twin(twin, "--stepz=1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"{twin.name}: error: " + result.stderr.strip().split(": error: ", 1)[1]]
    assert "unknown option(s) --stepz" in result.stderr and "valid keys:" in result.stderr


def test_usage_shows_the_presets_values():
    text = usage(ChildConfig, "tiny", None)
    assert "--steps" in text and " 5" in text.split("--steps")[1].splitlines()[0]
    assert "--extra" in text and " 7" in text.split("--extra")[1].splitlines()[0]
    assert "--preset " not in text


@dataclass
class CommentedConfig(DemoConfig):
    width: int = 64  # the model's width

    # a comment of its own
    depth: int = 2  # layers, a comment that goes
    # on below its field
    bare: int = 3


def test_usage_says_what_each_commented_option_does():
    lines = {line.split()[0]: line for line in usage(CommentedConfig, "tiny", None).splitlines()
             if line.startswith("  --")}
    assert lines["--width"].split(None, 2)[1:] == ["64", "the model's width"]
    assert lines["--depth"].split(None, 2)[1:] == ["2", "layers, a comment that goes on below its field"]
    assert lines["--bare"].split() == ["--bare", "3"] and lines["--steps"].split() == ["--steps", "5"]


def test_config_errors_end_a_script_with_status_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    end_scripts_on_user_errors()
    with pytest.raises(sc.ConfigError) as caught:
        with reading_settings():
            configure(DemoConfig, ["--stepz=1"], {})
    with pytest.raises(SystemExit) as stop:
        sys.excepthook(caught.type, caught.value, caught.tb)
    assert stop.value.code == 2
    assert "error: unknown option(s) --stepz for DemoConfig" in capsys.readouterr().err


def test_an_error_found_after_init_process_group_is_printed_through_torchs_hook(tmp_path, monkeypatch, capsys):
    # init_process_group wraps sys.excepthook, buffering what the wrapped hook prints until it returns: a hook that
    # raised SystemExit lost the message, so a status-1 error returns and Python exits with 1 itself
    import torch.distributed as dist

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(sys, "argv", ["05_sft.py"])
    end_scripts_on_user_errors()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        error = sc.ConfigError("tokens_per_step (2048) must be a multiple of micro_tokens x ranks")
        assert sys.excepthook(type(error), error, None) is None
    finally:
        dist.destroy_process_group()
    assert "[rank0]: 05_sft.py: error: tokens_per_step (2048) must be a multiple" in capsys.readouterr().err


def test_a_misspelt_option_is_named_with_its_close_setting():
    with pytest.raises(sc.ConfigError) as caught:
        configure(DemoConfig, ["--stepz=1", "--zzz=2", "--nam=x"], {})
    assert str(caught.value).startswith("unknown option(s) --nam, --stepz, --zzz for DemoConfig "
                                        "(did you mean --name, --steps?); valid keys: steps, lr, name, compile")
    with pytest.raises(sc.ConfigError, match=r"--zzz for DemoConfig; valid keys"):
        configure(DemoConfig, ["--zzz=2"], {})


def test_another_notebooks_setting_close_to_one_here_is_not_called_a_misspelling():
    """`STACK_RESUME=false python3 stackcore.py pipeline` (what the pipeline's stop line offers) reaches 01, 02, 04
    and 07 too, which have no `resume`: close to STACK_PRESET, it was called a misspelling of it in each."""
    from notebooks.config import misspelt_stack_variables

    environ = {"STACK_RESUME": "false", "STACK_BASE_RUN": "big", "STACK_STEPZ": "1"}
    assert misspelt_stack_variables(["steps", "vocab_size"], environ) == [
        "STACK_STEPZ is not a setting here and is ignored; did you mean STACK_STEPS?"]


def test_a_misspelt_stack_variable_is_warned_about(capsys):
    cfg = configure(DemoConfig, [], {"STACK_STEPZ": "1", "STACK_HOME": "/x", "STACK_TEST_DATA": "1",
                                     "STACK_VOCAB_SIZE": "384", "STACK_PRESET": "tiny"})
    assert cfg.steps == 5  # ignored: the tiny preset's value
    err = capsys.readouterr().err
    assert "STACK_STEPZ is not a setting here and is ignored; did you mean STACK_STEPS?" in err
    assert "STACK_HOME" not in err and "STACK_TEST_DATA" not in err
    assert "STACK_VOCAB_SIZE" not in err  # another notebook's setting (the pipeline sets them for all)
