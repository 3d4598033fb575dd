"""The whole pipeline from the command line: `python3 stackcore.py pipeline [--preset=...]` runs every notebook's
twin in order, each in its own process, then writes the report card (notebooks/report.py)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import stackcore as sc
from notebooks.config import HELP_FLAGS, reading_settings
from notebooks.report import format_duration, write_report
from notebooks.runtime import end_scripts_on_user_errors

ROOT = Path(__file__).resolve().parents[1]
USAGE = "usage: python stackcore.py pipeline [--preset=tiny|colab|speedrun|node]"
HELP = f"""{USAGE}

Runs notebooks/01_tokenizer.py to 07_chat.py in order, each in its own process with the same preset (by default
tiny on a CPU, offline; the real sizes on a GPU), then writes STACK_HOME/report.md. Other settings go in
STACK_<NAME>=value environment variables; each notebook lists its own with: python notebooks/03_pretrain.py --help"""


def run_pipeline(overrides: Sequence[str]) -> None:
    """Run every notebook's twin in order with the same preset (by default tiny on a CPU, offline; the real sizes on
    a GPU). Other settings go in STACK_<NAME> variables, which each notebook reads if it has that setting. Stops at
    the first notebook that fails. The twins get no standard input, so that 07_chat, run from a terminal, does not
    stop the pipeline at its interactive chat."""
    if any(not arg.startswith("--preset") for arg in overrides):
        raise sc.ConfigError("the pipeline takes only --preset=...; set other options as STACK_<NAME>=value")
    for twin in sorted(ROOT.glob("notebooks/[0-9][0-9]_*.py")):
        print(f"\n=== {twin.name} ===", flush=True)
        started = time.time()
        finished = subprocess.run([sys.executable, str(twin), *overrides], stdin=subprocess.DEVNULL)
        if finished.returncode:  # the twin has printed why; a traceback of this loop would add nothing
            again = " ".join(["STACK_RESUME=false python3 stackcore.py pipeline", *overrides])
            raise SystemExit(f"=== {twin.name} failed (exit status {finished.returncode}): the pipeline stops here; "
                             f"an option its message names goes in a variable when you run the pipeline again "
                             f"(--resume=false: {again}) ===")
        print(f"=== {twin.name} done in {format_duration(time.time() - started)} ===", flush=True)
    print(describe_run_outputs(sc.artifact_dir("runs")))
    print(f"report card: {write_report(sc.stack_home())}")


def describe_run_outputs(runs: Path) -> str:
    """Where a pipeline's plots and summaries are: each run folder with the files it holds."""
    lines = [f"Plots and summaries, under {runs}:"]
    for run in sorted(path for path in runs.iterdir() if path.is_dir()):
        files = sorted(path.name for path in run.iterdir() if path.suffix in (".png", ".json"))
        lines += [f"  {run.name}/: {', '.join(files)}"] if files else []
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    """`pipeline [--preset=...]`, as `python3 stackcore.py` passes it on."""
    if any(arg in HELP_FLAGS for arg in argv):
        print(HELP)
        return
    if argv[:1] != ["pipeline"]:
        sys.exit(USAGE)
    end_scripts_on_user_errors()
    with reading_settings():
        run_pipeline(argv[1:])
