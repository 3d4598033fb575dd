"""Pretraining benchmark: the product itself, `notebooks/03_pretrain.py`, at one depth for N steps.

Prints and writes to OUT/ours_d<depth>.json: steady-state tokens/s (median step after the first, which compiles),
the step time, time to the first step (the step itself, and from launch), peak memory, recompilations, and val
bits per byte at every evaluation, each with the tokens and training seconds (compilation included) behind it.
Evaluation covers the whole validation split once, in rows of --eval_batch_tokens tokens.

    python3 baselines/bench_pretrain.py --depth=12 --steps=60 --eval_every=10 --timeout=240 --out=$OUT \\
        --data=.gpu/data/english -- --warmup_steps=3 --cooldown_frac=0.5     # flags after -- go to 03_pretrain

A STACK_HOME without a tokenizer and pretraining shards gets them first from DATA/{train,val}.jsonl.gz, with the
library calls of 01_tokenizer and 02_sharding. CPU smoke test: --preset=tiny --vocab_size=512 --eval_batch_tokens=512.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stackcore as sc  # noqa: E402
from data.pretrain import iter_documents, local_corpus  # noqa: E402


def steady_step_seconds(step_seconds: list[float]) -> float | None:
    """Median step time with the first step (compilation) left out; None with fewer than two steps."""
    return statistics.median(step_seconds[1:]) if len(step_seconds) > 1 else None


def summarize(run: dict[str, Any]) -> dict[str, Any]:
    """Adds the derived figures to a run record with `step_seconds` (a list), `tokens_per_step` and `val`."""
    steady = steady_step_seconds(run["step_seconds"])
    first = run["step_seconds"][0] if run["step_seconds"] else None
    return {**run, "steps_done": len(run["step_seconds"]), "first_step_seconds": first, "steady_step_seconds": steady,
            "tokens_per_second": run["tokens_per_step"] / steady if steady else None,
            "compile_seconds": first - steady if first and steady else None,
            "train_seconds": sum(run["step_seconds"]),
            "final_val_bpb": run["val"][-1]["val_bpb"] if run["val"] else None}


def prepare_artifacts(data: Path, vocab_size: int, workers: int) -> None:
    """Tokenizer and pretraining shards in STACK_HOME from DATA/{train,val}.jsonl.gz, unless they are there."""
    tokenizer_dir, shard_dir = sc.artifact_dir("tokenizer"), sc.artifact_dir("shards") / "pretrain"
    if (tokenizer_dir / sc.TOKEN_BYTES).exists() and list(shard_dir.glob("val_*.bin")):
        return
    files = local_corpus(str(data / "train.jsonl.gz"), str(data / "val.jsonl.gz"))
    sc.Tokenizer.train(iter_documents(files, "train"), vocab_size).save(tokenizer_dir)
    for split in ("train", "val"):
        writer = sc.ShardWriter(shard_dir, split, 100_000_000, vocab_size)
        for ids in sc.tokenize_parallel(tokenizer_dir, iter_documents(files, split), workers):
            writer.add(ids)
        writer.flush()
        print(f"prepared {split}: {sum(tokens for _, tokens, _ in writer.written):,} tokens in {shard_dir}")


def validation_rows(row_tokens: int) -> int:
    """How many BOS-aligned rows of `row_tokens` one pass over the validation split gives (03's val loader)."""
    tokenizer = sc.Tokenizer.load(sc.artifact_dir("tokenizer"))
    loader = sc.PretrainLoader(sc.artifact_dir("shards") / "pretrain", "val", tokens=row_tokens,
                               bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size, max_doc_len=row_tokens)
    rows = 0
    while True:
        loader.next_batch()
        if loader.position["epoch"] > 0:  # this row wrapped around to the start
            return max(rows, 1)
        rows += 1


def run_logged(command: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs `command`, writing its output to `log_path`; kills its process group after `timeout` seconds or when
    this process is terminated. Returns the exit code (124 on timeout), the wall time and when the first training
    step was logged."""
    started = time.time()
    first_step = None
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=ROOT, start_new_session=True)
        def kill(*_: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

        signal.signal(signal.SIGTERM, lambda *_: (kill(), sys.exit(124)))
        timer = threading.Timer(timeout, kill)
        timer.start()
        for line in process.stdout:
            log.write(line)
            if first_step is None and line.startswith("step ") and "tok/s" in line:
                first_step = time.time() - started
        process.wait()
        timed_out = not timer.is_alive()
        timer.cancel()
    return {"rc": 124 if timed_out else process.returncode, "wall_seconds": time.time() - started,
            "first_step_wall_seconds": first_step}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """03's metrics.jsonl: (step records, validation records)."""
    records = [json.loads(line) for line in open(path)] if path.exists() else []
    return [r for r in records if "loss" in r], [r for r in records if "val_bpb" in r]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_line(run: dict[str, Any]) -> str:
    steady_ms = run["steady_step_seconds"] and run["steady_step_seconds"] * 1e3
    curve = " ".join(f"{v['step']}:{v['val_bpb']:.4f}" for v in run["val"])
    return (f"{run['name']}: rc {run['rc']}, {run['steps_done']} steps | steady "
            f"{fmt(run['tokens_per_second'], ',.0f')} tok/s ({fmt(steady_ms, '.0f')} ms/step) | first step "
            f"{fmt(run['first_step_seconds'], '.1f')} s | peak {fmt(run['peak_memory_GB'], '.2f')} GB | "
            f"recompiles {run.get('recompiles', '-')} | val bpb {curve or '-'}")


def train_command(args: argparse.Namespace, name: str, eval_tokens: int, extra: list[str]) -> list[str]:
    return [sys.executable, "notebooks/03_pretrain.py", f"--preset={args.preset}", f"--depth={args.depth}",
            f"--steps={args.steps}", f"--eval_every={args.eval_every}", f"--save_every={args.steps + 1}",
            f"--eval_batch_tokens={args.eval_batch_tokens}", f"--eval_tokens={eval_tokens}", "--resume=false",
            f"--run_name={name}", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--eval_batch_tokens", type=int, default=8192)
    parser.add_argument("--preset", default="speedrun")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for all of it, preparation included")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu" / "data" / "english")
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--name", default="", help="run name (default ours_d<depth>)")
    args, extra = parser.parse_known_args()
    started = time.time()
    name = args.name or f"ours_d{args.depth}"
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_artifacts(args.data, args.vocab_size, workers=min(8, os.cpu_count() or 1))
    eval_tokens = validation_rows(args.eval_batch_tokens) * args.eval_batch_tokens
    command = train_command(args, name, eval_tokens, [a for a in extra if a != "--"])
    metrics = sc.artifact_dir("runs") / name / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles")}
    timeout = args.timeout - (time.time() - started) - 5  # 5 s kept for reading the results
    print(f"{name}: {' '.join(command[1:])} (timeout {timeout:.0f} s)", flush=True)
    run = run_logged(command, args.out / f"{name}.log", timeout, env)
    steps, val = read_metrics(metrics)
    result = summarize({
        "system": "ours", "name": name, "depth": args.depth, "command": command[1:], **run,
        "tokens_per_step": steps[0]["tokens"] // steps[0]["step"] if steps else None,
        "step_seconds": [r["step_seconds"] for r in steps],
        "val": [{k: r[k] for k in ("step", "tokens", "train_seconds", "val_bpb")} for r in val],
        "peak_memory_GB": steps[-1].get("peak_memory_GB") if steps else None, "eval_tokens": eval_tokens,
        "recompiles": (args.out / f"{name}.log").read_text(errors="replace").count("Recompiling function"),
    })
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    print(report_line(result), flush=True)


if __name__ == "__main__":
    main()
