"""Rerun a record of baselines/ on your own GPU, from a data path, and compare with what the record measured.

    python3 baselines/reproduce.py --data=PATH/books                   # the newest record that can be rerun
    python3 baselines/reproduce.py --data=PATH/books --record=2026-11-30-books-d12 --seeds=0,1,2 --out=repro
    python3 baselines/reproduce.py --data=PATH/books -- --steps=45     # later flags win; 03_pretrain's pass through

A record can be rerun when its folder has a `record.json`: the benchmark script (one of SCRIPTS), its arguments,
the seeds, and the figures the record measured (null where it did not). The rerun writes its logs and JSON to
--out (default reproduce-out/<record>) and ends with the record's figures beside this run's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

BASELINES = Path(__file__).resolve().parent
SCRIPTS = ("bench_pretrain.py",)  # the benchmarks that take --data, --out and --seeds


def records() -> dict[str, dict[str, Any]]:
    """Every record that can be rerun, by folder name, oldest first."""
    return {path.parent.name: json.loads(path.read_text()) for path in sorted(BASELINES.glob("*/record.json"))}


def rerun_command(record: dict[str, Any], data: Path, out: Path, seeds: str, extra: list[str]) -> list[str]:
    """The record's command with this machine's data and output folders; `extra` comes last, so its flags win."""
    return [sys.executable, str(BASELINES / record["script"]), *record["args"], f"--data={data}", f"--out={out}",
            f"--seeds={seeds}", *extra]


def comparison(record: dict[str, Any], summary: dict[str, Any]) -> str:
    """The record's figures beside the rerun's spread over seeds."""
    from bench_pretrain import fmt, fmt_spread

    lines = ["| figure | record | this run |", "| --- | --- | --- |"]
    for key, spec in (("target_seconds", ".1f"), ("target_step", ".1f"), ("final_val_bpb", ".4f"),
                      ("tokens_per_second", ",.0f")):
        lines.append(f"| {key} | {fmt(record['result'].get(key), spec)} | {fmt_spread(summary['spread'][key], spec)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the data folder the record names (e.g. books)")
    parser.add_argument("--record", default="", help="a folder of baselines/ with a record.json (default: newest)")
    parser.add_argument("--out", type=Path, default=None, help="default reproduce-out/<record>")
    parser.add_argument("--seeds", default="", help="comma-separated (default: the record's)")
    args, extra = parser.parse_known_args(argv)
    known = records()
    name = args.record or (list(known)[-1] if known else "")
    if name not in known:
        raise SystemExit(f"no record {name!r} can be rerun; these can: {', '.join(known) or 'none'}")
    record = known[name]
    out = args.out or Path("reproduce-out") / name
    command = rerun_command(record, args.data, out, args.seeds or record["seeds"], [a for a in extra if a != "--"])
    print(f"record {name}: {' '.join(command[1:])}", flush=True)
    rc = subprocess.run(command).returncode
    for summary_path in sorted(set(out.glob("*.json")) - set(out.glob("*_seed*.json"))):  # the spread over seeds
        print(comparison(record, json.loads(summary_path.read_text())))
    return rc


if __name__ == "__main__":
    sys.exit(main())
