"""Every notebook has a py:percent twin with the same cells, and the notebooks run top to bottom (nbval) in the
tiny preset, in order, sharing one STACK_HOME; the twins run headless, also under torchrun on CPU."""
import json
import os
import subprocess
import sys

import jupytext
import pytest

from conftest import ROOT

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


def test_notebooks_run_in_order_with_nbval(stack_home):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                             *map(str, NOTEBOOKS)], cwd=ROOT, env=tiny_env(stack_home), capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    summary = json.loads((stack_home / "runs" / "pretrain" / "summary.json").read_text())
    assert summary["final_val_bpb"] < 1.5  # from about 3 bits per byte at initialisation


def test_twins_run_headless_and_under_torchrun(stack_home):
    env = tiny_env(stack_home)
    for twin in ("01_tokenizer.py", "02_sharding.py"):
        subprocess.run([sys.executable, f"notebooks/{twin}"], cwd=ROOT, env=env, check=True, capture_output=True)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "notebooks/03_pretrain.py", "--steps=4", "--eval_every=2", "--run_name=ddp"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    summary = json.loads((stack_home / "runs" / "ddp" / "summary.json").read_text())
    assert summary["ranks"] == 2 and summary["steps"] == 4
    assert (stack_home / "checkpoints" / "ddp" / "step_000004.rank1.pt").is_file()
    summary_file = stack_home / "runs" / "ddp" / "summary.json"
    before = summary_file.read_bytes()
    again = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--steps=4", "--run_name=ddp"], cwd=ROOT,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "'ddp' is already complete" in again.stdout, again.stdout[-4000:] + again.stderr
    assert "--steps=<more than 4>" in again.stdout and summary_file.read_bytes() == before
    longer = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--steps=6", "--eval_every=2",
                             "--run_name=ddp"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert longer.returncode == 0, longer.stdout[-4000:] + longer.stderr[-4000:]
    assert "resumed from" in longer.stdout and "step_000004.pt at step 4" in longer.stdout  # 2 ranks' files, 1 process
    summary = json.loads(summary_file.read_text())
    assert summary["ranks"] == 1 and summary["steps"] == 6 and summary["tokens"] == 6 * 4096
    bad = subprocess.run([sys.executable, "notebooks/03_pretrain.py", "--stepz=4"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "valid keys" in bad.stderr
