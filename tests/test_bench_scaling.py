"""baselines/bench_scaling.py, one process against two: its options and table, and one CPU run of every stage in the
tiny preset with two gloo processes (CUDA hidden), then a stage that fails under torchrun, named with its log."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from test_baselines import write_corpus

sys.path.insert(0, str(ROOT / "baselines"))
import bench_scaling as scaling  # noqa: E402


def test_stages_run_in_dependency_order_and_bad_options_are_refused():
    assert scaling.stage_list("rl, sft,pretrain") == ["pretrain", "sft", "rl"]
    assert scaling.stage_setting("sft:--micro_tokens=1024") == ("sft", "--micro_tokens=1024")
    for bad in ("", "pretrain,chat"):
        with pytest.raises(Exception, match="--stages takes some of pretrain, core, sft, rl"):
            scaling.stage_list(bad)
    for bad in ("chat:--steps=1", "sft:steps=1", "sft"):
        with pytest.raises(Exception, match="--set takes STAGE:--name=value"):
            scaling.stage_setting(bad)
    with pytest.raises(SystemExit, match="stage rl starts from stage sft's one-process checkpoint"):
        scaling.check_plan(scaling.parse_args(["--stages=rl"]))


@pytest.mark.parametrize("option, message", [("--nproc=1", "--nproc must be at least 2"),
                                             *((f"--timeout={bad}", "expected a positive number of seconds")
                                               for bad in ("0", "-5", "nan", "inf", "soon"))])
def test_bad_process_counts_and_timeouts_stop_before_any_work(option, message, capsys):
    with pytest.raises(SystemExit) as stop:
        scaling.parse_args([option])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert scaling.parse_args(["--timeout=90.5", "--nproc=4"]).timeout == 90.5


def test_the_table_compares_each_stage_with_its_target():
    runs = [{"stage": "pretrain", "processes": 1, "per_second": 100.0},
            {"stage": "pretrain", "processes": 2, "per_second": 195.0},
            {"stage": "rl", "processes": 1, "per_second": 4.0}, {"stage": "rl", "processes": 2, "per_second": 6.0},
            {"stage": "sft", "processes": 1, "per_second": 50.0}]  # its two-process run failed: no row
    rows = scaling.comparisons(runs, nproc=2)
    assert [(row["stage"], row["ratio"], row["target"]) for row in rows] == [("pretrain", 1.95, 1.9),
                                                                              ("rl", 1.5, 1.9)]
    table = scaling.markdown_table(rows, nproc=2)
    assert "| 03_pretrain | tokens/s | 100.0 | 195.0 | 1.95x | 1.9x | yes |" in table
    assert "| 06_rl | rollouts/s | 4.0 | 6.0 | 1.50x | 1.9x | no |" in table
    assert scaling.comparisons(runs, nproc=4) == []
    assert scaling.after_first([9.0, 1.0, 3.0, 2.0]) == 2.0 and scaling.after_first([9.0]) is None


def test_every_stage_on_one_and_two_cpu_processes(tmp_path, stack_home):
    data, out = write_corpus(tmp_path / "books", val_docs=40), tmp_path / "out"  # val rows for 2 ranks x 2048
    env = {**scaling.os.environ, "STACK_HOME": str(stack_home), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "baselines/bench_scaling.py", "--preset=tiny", "--depth=2", f"--data={data}",
               "--vocab_size=512", "--gsm8k=synthetic", f"--out={out}", "--pretrain_steps=2", "--sft_steps=2",
               "--rl_steps=2", "--stages=pretrain,core,sft,rl"]
    # --set reaches both runs of a stage (tiny's SFT passes are 1,024 tokens already: the step splits over two ranks)
    result = subprocess.run([*command, "--set=sft:--micro_tokens=1024"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "scaling.json").read_text())
    assert [row["stage"] for row in results["comparisons"]] == ["pretrain", "core", "sft", "rl"]
    for row in results["comparisons"]:
        assert row["one"] > 0 and row["many"] > 0 and row["ratio"] == row["many"] / row["one"]
    assert [(run["stage"], run["processes"]) for run in results["runs"]] == [
        (stage, processes) for stage in ("pretrain", "core", "sft", "rl") for processes in (1, 2)]
    for run in results["runs"]:
        assert run["ranks"] == run["processes"], run  # what the twin itself wrote in its summary
        assert (out / f"{run['stage']}_{run['processes']}gpu.log").read_text().startswith("=" * 100)
    rl = results["runs"][-1]
    assert rl["rollouts_per_step"] == 8 and rl["steps"] == 2 and rl["rollout_seconds"] > 0
    assert "| 05_sft | tokens/s |" in (out / "scaling.md").read_text() and "| 04_core_eval |" in result.stdout
    assert (stack_home / "shards" / "sft").is_dir() and not (stack_home / "scaling_scratch").exists()
    kept = sorted(path.name for path in (stack_home / "checkpoints").iterdir())  # what a later stage starts from
    assert kept == ["scaling_pretrain_1gpu", "scaling_rl_1gpu", "scaling_sft_1gpu"]

    # with passes of the whole step, 05 stops under torchrun: the bench names the stage, its log and the twin's message
    failed = subprocess.run([*command[:-1], "--stages=sft", "--set=sft:--micro_tokens=2048"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert failed.returncode == 1
    assert f"stage sft on 2 process(es) failed (exit status 1); log: {out / 'sft_2gpu.log'}" in failed.stderr
    assert "05_sft.py: error: tokens_per_step (2048) must be a multiple of micro_tokens x ranks" in failed.stderr
    written = json.loads((out / "scaling.json").read_text())
    assert [(run["stage"], run["processes"]) for run in written["runs"]] == [("sft", 1)]
