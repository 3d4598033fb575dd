"""Every notebook has a py:percent twin with the same cells, and the notebooks run top to bottom (nbval) in the
tiny preset, in order, sharing one STACK_HOME; the twins run headless, also under torchrun on CPU."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
import torch

import stackcore as sc
from conftest import ROOT
from data.tokenizing import SHARDS_STAMP
from plot_check import figures_that_do_not_explain_themselves

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_every_notebook_has_a_twin_and_vice_versa():
    twins = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    assert [p.stem for p in NOTEBOOKS] == [p.stem for p in twins] and NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_twin_in_sync(notebook):
    def cells(path):
        return [(cell.cell_type, cell.source) for cell in jupytext.read(path).cells]

    assert cells(notebook) == cells(notebook.with_suffix(".py")), \
        f"{notebook.name} and its twin differ: run `jupytext --sync {notebook.relative_to(ROOT)}`"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_starts_with_prose_and_explains_each_step(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    assert cells[0]["cell_type"] == "markdown"
    for before, cell in zip(cells, cells[1:]):
        if cell["cell_type"] == "code":
            assert before["cell_type"] == "markdown" or before is cells[0], \
                f"{notebook.name}: a code cell without a markdown cell before it: {''.join(cell['source'])[:80]!r}"


def tiny_env(stack_home):
    return {**os.environ, "STACK_HOME": str(stack_home), "STACK_PRESET": "tiny", "PYTHONUNBUFFERED": "1"}


def test_notebooks_run_in_order_with_nbval(stack_home, tmp_path):
    """... and every plot they save has a title and axes that say what they show (tests/plot_check.py)."""
    plot_log = tmp_path / "plots.jsonl"
    env = {**tiny_env(stack_home), "MPLBACKEND": "module://plot_check", "PLOT_CHECK_LOG": str(plot_log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             *map(str, NOTEBOOKS)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    saved = {Path(json.loads(line)["file"]).name for line in plot_log.read_text().splitlines()}
    assert {"compression.png", "shards.png", "core.png", "chat_evals.png"} <= saved
    assert figures_that_do_not_explain_themselves(plot_log) == []
    summary = json.loads((stack_home / "runs" / "pretrain" / "summary.json").read_text())
    assert summary["final_val_bpb"] < 1.5  # from about 3 bits per byte at initialisation
    fingerprint = sc.Tokenizer.load(stack_home / "tokenizer").fingerprint  # what 02-06 record and 03-07 check
    for shard_set in ("pretrain", "core", "sft", "gsm8k"):
        assert (stack_home / "shards" / shard_set / SHARDS_STAMP).read_text().strip() == fingerprint
    for run, made_by in sc.CHECKPOINT_MAKERS.items():
        saved = torch.load(sc.latest_checkpoint(stack_home / "checkpoints" / run), weights_only=True)
        assert (saved["tokenizer_fingerprint"], saved["made_by"]) == (fingerprint, made_by)
    one_reply = subprocess.run([sys.executable, "notebooks/07_chat.py", "--prompt=What is 2+2?"], cwd=ROOT,
                               env=tiny_env(stack_home), capture_output=True, text=True, timeout=600)
    assert one_reply.returncode == 0, one_reply.stdout[-4000:] + one_reply.stderr[-3000:]
    assert "report.md" in one_reply.stdout and "# DecoderStack report card" not in one_reply.stdout


def test_twins_run_headless_and_under_torchrun(stack_home):
    env = tiny_env(stack_home)
    for twin in ("01_tokenizer.py", "02_sharding.py"):
        subprocess.run([sys.executable, f"notebooks/{twin}"], cwd=ROOT, env=env, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "notebooks/03_pretrain.py", "--steps=4", "--eval_every=2", "--save_every=2",
                             "--run_name=ddp"],
                            cwd=ROOT, env={**env, "CUDA_VISIBLE_DEVICES": ""},  # two CPU (gloo) ranks, GPUs or not
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((stack_home / "runs" / "ddp" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 4
    checkpoints = stack_home / "checkpoints" / "ddp"
    assert (checkpoints / "step_000004.rank1.pt").is_file()
    assert "nanobind" not in result.stdout + result.stderr  # triton's teardown report (runtime.silence_triton_teardown)
    summary_file = stack_home / "runs" / "ddp" / "summary.json"
    before = summary_file.read_bytes()
    again = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--steps=4", "--run_name=ddp"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "'ddp' is already complete" in again.stdout, again.stdout[-4000:] + again.stderr
    assert "start a new run with more steps" in again.stdout and summary_file.read_bytes() == before
    assert "resumed from" not in again.stdout  # a complete run says so once, and resumes nothing
    longer = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--steps=6", "--run_name=ddp"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    said = longer.stdout + longer.stderr  # a cooled schedule is not stretched: refused in one line
    assert longer.returncode != 0 and "was started for 4 steps" in said and "Traceback" not in said, said[-4000:]
    for stale in checkpoints.glob("step_000004*"):  # as if the two-rank run had been stopped after step 2
        stale.unlink()
    earlier_seconds = torch.load(checkpoints / "step_000002.pt", weights_only=True)["totals"]["train_seconds"]
    resumed = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--steps=4", "--eval_every=2",
                              "--run_name=ddp"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    # 2 ranks' files, 1 process
    assert "resumed from" in resumed.stdout and "step_000002.pt at step 2" in resumed.stdout
    summary = json.loads(summary_file.read_text())
    assert summary["ranks"] == 1 and summary["steps"] == 4 and summary["tokens"] == 4 * 4096
    records = [json.loads(line) for line in (stack_home / "runs" / "ddp" / "metrics.jsonl").read_text().splitlines()]
    logged = [(record["step"], "val_bpb" in record) for record in records]
    assert sorted(set(logged)) == logged and (2, True) in logged  # resuming evaluates step 2 again nowhere
    this_session = sum(record["step_seconds"] for record in records if record["step"] > 2 and "loss" in record)
    assert summary["train_seconds"] == pytest.approx(earlier_seconds + this_session, abs=0.11)  # both sessions
    bad = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--stepz=4"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "valid keys" in bad.stderr and "Traceback" not in bad.stderr


QUIET_CALLS = {"print", "log", "display", "plt.show", "setup_runtime", "chat_loop"}  # they return None


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_cell_shows_a_stray_return_value(notebook):
    """A cell whose last line is a call shows what the call returns (`write_text` shows a byte count): such a line
    ends with `;`, unless the call is one that returns None. A bare name at the end is meant to be shown."""
    for cell in jupytext.read(notebook.with_suffix(".py")).cells:
        if cell.cell_type != "code":
            continue
        last = ast.parse(cell.source).body[-1]
        if isinstance(last, ast.Expr) and isinstance(last.value, ast.Call):
            called = ast.unparse(last.value.func)
            line = cell.source.rstrip().splitlines()[-1]
            assert called in QUIET_CALLS or called.endswith(".mkdir") or line.endswith(";"), \
                f"{notebook.name}: the cell ending {line.strip()!r} shows the value of {called}(...): end it with ;"


def test_a_streamed_reply_is_one_growing_output_in_a_notebook(monkeypatch, capsys):
    """07's chat cell in a kernel: one display, updated piece by piece (a notebook saves one output, not one per
    piece); as a script it prints the pieces."""
    import IPython.display

    cell = next(c.source for c in jupytext.read(ROOT / "notebooks" / "07_chat.py").cells
                if c.cell_type == "code" and "session.reply(question)" in c.source)
    cell = "question = " + cell.split("question = ", 1)[1]  # from the question on: no engine needed

    class Session:
        def reply(self, text):
            yield from ["Hel", "lo", "!"]

    class Handle:
        def __init__(self):
            self.updates = []

        def update(self, obj):
            self.updates.append(obj.data)

    handles = []
    monkeypatch.setattr(IPython.display, "display",
                        lambda obj, display_id: handles.append(Handle()) or handles[-1])
    cfg = type("Cfg", (), {"prompt": "Hi"})()
    for kernel in (True, False):
        exec(cell, {"in_notebook_kernel": lambda: kernel, "session": Session(), "cfg": cfg})
    assert len(handles) == 1 and handles[0].updates[-1] == "assistant> Hello!"
    assert capsys.readouterr().out == "you> Hi\nyou> Hi\nassistant> Hello!\n"
