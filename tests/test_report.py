"""The report card: STACK_HOME/report.md gathers every notebook's summary and figures, says "not run" for the
notebooks that have not run, names a damaged summary instead of failing, and ends the pipeline."""
import json
import subprocess
import sys

import pytest
from pathlib import Path

from notebooks.pipeline import describe_run_outputs, run_pipeline
from notebooks.report import REPORT_RUNS, write_report


def write_summary(home, folder, summary, figures=()):
    run_dir = home / "runs" / folder
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps(summary))
    for name in figures:
        (run_dir / name).write_bytes(b"\x89PNG")


CORE_SUMMARY = {"step": 100, "core": 0.1234, "val_bpb": 0.98765, "device": "NVIDIA H100", "ranks": 8,
                "preset": "node", "attention": "flash", "seconds": 56.4,
                "tasks": {"arc_easy": {"examples": 8, "accuracy": 0.5, "baseline": 0.25, "centered": 0.3333}}}


def test_a_home_without_runs_reports_every_notebook_as_not_run(stack_home):
    text = write_report(stack_home).read_text()
    assert (stack_home / "report.md").is_file()
    for _, folder, _ in REPORT_RUNS:
        assert f"Not run (no `runs/{folder}/summary.json`)" in text


def test_the_report_holds_each_summary_its_figures_timings_and_hardware(stack_home):
    write_summary(stack_home, "01_tokenizer", {"vocab_size": 32768, "train_chars": 2_000_000, "train_seconds": 12.5,
                                               "bytes_per_token": {"ours (32768)": 4.51, "gpt2 (50257)": 4.38}},
                  ["compression.png"])
    write_summary(stack_home, "04_core_eval", CORE_SUMMARY, ["core.png", "prefix_tree_mask.png"])
    stages = {"base": {"tasks": {"arc_easy": {"accuracy": 0.25, "baseline": 0.25}}, "chatcore": 0.0},
              "sft": {"tasks": {"arc_easy": {"accuracy": 0.4, "baseline": 0.25}}, "chatcore": 0.2}}
    write_summary(stack_home, "sft", {"steps": 20, "final_val_loss": 1.5, "chat": stages, "device": "cpu", "ranks": 1,
                                      "preset": "tiny", "attention": "sdpa", "train_seconds": 3.0})
    text = write_report(stack_home).read_text()
    assert "| ours (32768) | 4.51 |" in text and "| gpt2 (50257) | 4.38 |" in text
    assert "CORE **0.1234** at step 100" in text and "| arc_easy | 8 | 0.5 | 0.25 | 0.3333 |" in text
    assert "![01_tokenizer compression](runs/01_tokenizer/compression.png)" in text
    assert "![04_core_eval prefix_tree_mask](runs/04_core_eval/prefix_tree_mask.png)" in text
    assert "| arc_easy | 0.25 | 0.4 |\n| ChatCORE | 0 | 0.2 |" in text
    assert "| 04 · CORE | seconds | 56.4 |" in text and "| 01 · Tokenizer | train_seconds | 12.5 |" in text
    assert "| 04 · CORE | NVIDIA H100 x 8, preset node, attention flash |" in text
    assert "Not run (no `runs/pretrain/summary.json`)" in text and "Not run (no `runs/rl/summary.json`)" in text


def test_the_core_score_names_the_checkpoint_it_scored(stack_home):
    """04 writes one summary whatever run it scores (--run_name=big): the report card says which, so a CORE score is
    not read as that of the pretraining run reported beside it."""
    write_summary(stack_home, "04_core_eval", {**CORE_SUMMARY, "checkpoint": "/home/me/checkpoints/big/step_000100.pt"})
    assert "CORE **0.1234** of `big/step_000100.pt` at step 100" in write_report(stack_home).read_text()


def test_pretraining_figures_a_cpu_does_not_measure_are_left_out(stack_home):
    write_summary(stack_home, "pretrain", {"parameters": 1_048_594, "steps": 100, "tokens": 409_600,
                                           "final_val_bpb": 0.44, "tokens_per_second": 8428, "mfu": None,
                                           "peak_memory_GB": None})
    text = write_report(stack_home).read_text()
    assert "| steps | 100 |" in text and "| tokens_per_second | 8428 |" in text
    assert "mfu" not in text and "peak_memory_GB" not in text and "None" not in text


def test_a_damaged_summary_is_named_and_the_rest_still_reported(stack_home):
    write_summary(stack_home, "04_core_eval", CORE_SUMMARY)
    (stack_home / "runs" / "pretrain").mkdir(parents=True)
    (stack_home / "runs" / "pretrain" / "summary.json").write_text('{"steps": 10')  # cut short by a crash
    write_summary(stack_home, "rl", {"steps": 4})  # missing keys: an older or foreign summary
    text = write_report(stack_home).read_text()
    assert "`runs/pretrain/summary.json` is unreadable (JSONDecodeError" in text
    assert "`runs/rl/summary.json` is unreadable (KeyError" in text
    assert "CORE **0.1234**" in text


def test_the_pipeline_ends_with_the_report(stack_home, monkeypatch, capsys):
    ran = []

    def fake_run(command, **kwargs):  # the twins and `git rev-parse`, not run
        ran.append(command)
        return subprocess.CompletedProcess(command, 0, stdout="abc1234\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    run_pipeline(["--preset=tiny"])
    assert [Path(command[1]).name for command in ran[:2]] == ["01_tokenizer.py", "02_sharding.py"]
    assert f"report card: {stack_home / 'report.md'}" in capsys.readouterr().out
    assert "at commit abc1234" in (stack_home / "report.md").read_text()


def test_the_pipeline_ends_by_saying_where_its_plots_and_summaries_are(tmp_path):
    for run, names in {"pretrain": ["curves.png", "summary.json", "metrics.jsonl"], "empty": []}.items():
        (tmp_path / run).mkdir()
        for name in names:
            (tmp_path / run / name).write_text("")
    assert describe_run_outputs(tmp_path).splitlines() == [
        f"Plots and summaries, under {tmp_path}:", "  pretrain/: curves.png, summary.json"]


def test_the_pipeline_command_refuses_other_options_in_one_line():
    """`python3 stackcore.py pipeline` (the README's command) takes a preset only; anything else is a usage error."""
    root = Path(__file__).resolve().parents[1]
    bad = subprocess.run([sys.executable, "stackcore.py", "pipeline", "--steps=3"], cwd=root, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == ("stackcore.py: error: the pipeline takes only --preset=...; "
                                  "set other options as STACK_<NAME>=value")
    missing = subprocess.run([sys.executable, "stackcore.py"], cwd=root, capture_output=True, text=True)
    assert missing.returncode == 1 and "usage: python stackcore.py pipeline" in missing.stderr


@pytest.mark.parametrize("args", [["--help"], ["pipeline", "--help"], ["pipeline", "-h"]])
def test_the_pipeline_help_says_what_it_runs_and_exits_0(args):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "stackcore.py", *args], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("usage: python stackcore.py pipeline") and "STACK_<NAME>" in result.stdout


def test_the_pipeline_gives_its_twins_no_stdin(monkeypatch, tmp_path):
    """From a terminal, 07_chat would otherwise open its interactive chat and the pipeline would wait on it."""
    twin_calls, real_run = [], subprocess.run

    def run(args, **kwargs):
        if args[0] == sys.executable:
            twin_calls.append(kwargs)
            return subprocess.CompletedProcess(args, 0)
        return real_run(args, **kwargs)

    monkeypatch.setattr(subprocess, "run", run)
    monkeypatch.setenv("STACK_HOME", str(tmp_path))
    run_pipeline(["--preset=tiny"])
    assert len(twin_calls) == 7 and all(kwargs.get("stdin") is subprocess.DEVNULL for kwargs in twin_calls)


def test_the_pipeline_stops_at_a_failed_twin_with_one_line(monkeypatch):
    ran = []

    def run(args, **kwargs):
        ran.append(args)
        return subprocess.CompletedProcess(args, 2)

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(SystemExit, match=r"=== 01_tokenizer.py failed \(exit status 2\): the pipeline stops") as stop:
        run_pipeline(["--preset=huge"])
    assert len(ran) == 1
    # a twin's message names command-line options (--resume=false), which the pipeline takes as STACK_ variables
    assert "(--resume=false: STACK_RESUME=false python3 stackcore.py pipeline --preset=huge)" in str(stop.value.code)
