"""Pretraining benchmark and record run: the product itself, `notebooks/03_pretrain.py`, at one depth for N steps,
once per seed, timed to a target validation bits per byte.

The target (issue 21, like modded-nanogpt's 3.28 val loss): **val bpb 1.52 on `books/val` with the depth-12 model
on one GPU**. Time to target is the training time at the first evaluation whose val bpb is at or below the target:
the sum of the step times up to that step, the first step's compilation counted, the evaluations left out (as
modded-nanogpt leaves its validation out). There is no interpolation between evaluations: the figure is the time
of an evaluation that was really at or below the target, so a coarser --eval_every can only make it later.

    python3 baselines/bench_pretrain.py --data=DATA/books --seeds=0,1 --out=OUT
    python3 baselines/bench_pretrain.py --data=DATA/books -- --warmup_steps=3   # flags after -- go to 03_pretrain

DATA holds `train.jsonl.xz` or `train.jsonl.gz` and `val.jsonl.gz` (or `.xz`), one JSON object with a `text`
field a line. A STACK_HOME without a tokenizer and pretraining shards gets them first from those files, with the
library calls of 01_tokenizer and 02_sharding; a STACK_HOME whose shards came from other files is refused.
Each seed's log, OUT/<name>_seed<S>.log, starts with the code that ran (the commit and `git diff HEAD`, or the
source files where there is no git checkout), then 03's output. OUT/<name>_seed<S>.json holds that run's figures
and OUT/<name>.json the mean and spread over the seeds. CPU smoke test: --preset=tiny --vocab_size=512
--eval_batch_tokens=512 --target=10.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import lzma
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import stackcore as sc  # noqa: E402
from data.tokenizing import tokenize_parallel  # noqa: E402

BOOKS_TARGET_BPB = 1.52
CODE_FILES = ("stackcore.py", "notebooks/03_pretrain.py", "notebooks/training.py",  # what a run executes
              "baselines/bench_pretrain.py")


def split_file(data: Path, split: str) -> Path:
    """DATA/<split>.jsonl.xz or .gz, whichever is there."""
    for suffix in (".jsonl.xz", ".jsonl.gz"):
        if (data / f"{split}{suffix}").is_file():
            return data / f"{split}{suffix}"
    raise FileNotFoundError(f"{data}: no {split}.jsonl.xz or {split}.jsonl.gz (the --data folder)")


def read_texts(path: Path) -> Iterator[str]:
    """The `text` field of each line of a .jsonl.xz (read through lzma, no decompressed copy) or .jsonl.gz file."""
    opener = lzma.open if path.name.endswith(".xz") else gzip.open
    with opener(path, "rt", encoding="utf-8") as lines:
        for line_no, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{line_no}: not a JSON object with a 'text' field ({error})") from None


def data_signature(files: list[Path]) -> str:
    """Names and sizes of the files the artifacts were made from: enough to tell two data folders apart."""
    return "\n".join(f"{path.name} {path.stat().st_size}" for path in files) + "\n"


def prepare_artifacts(data: Path, vocab_size: int, workers: int) -> None:
    """Tokenizer and pretraining shards in STACK_HOME from DATA's train and val files, unless they are there. Shards
    made from other files are an error, not silently reused."""
    tokenizer_dir, shard_dir = sc.artifact_dir("tokenizer"), sc.artifact_dir("shards") / "pretrain"
    files = {split: split_file(data, split) for split in ("train", "val")}
    signature, source = data_signature(list(files.values())), shard_dir / "bench_source.txt"
    if (tokenizer_dir / sc.TOKENIZER_META).exists() and list(shard_dir.glob("val_*.bin")):
        if source.exists() and source.read_text() != signature:
            raise ValueError(f"{shard_dir} was made from other files ({source.read_text().strip()!r}); "
                             f"use another STACK_HOME for {data}")
        return
    sc.Tokenizer.train(read_texts(files["train"]), vocab_size).save(tokenizer_dir)
    for split, path in files.items():
        writer = sc.ShardWriter(shard_dir, split, 100_000_000, vocab_size)
        for ids in tokenize_parallel(tokenizer_dir, read_texts(path), workers):
            writer.add(ids)
        writer.flush()
        print(f"prepared {split}: {sum(tokens for _, tokens, _ in writer.written):,} tokens in {shard_dir}")
    source.write_text(signature)


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


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def code_header() -> str:
    """The code that ran, for the top of a log (modded-nanogpt's logs start with their source): the commit and the
    working tree's diff against it, or, without a git checkout (a copy of the files), the source files themselves."""
    rule = "=" * 100
    try:
        commit, diff = git("rev-parse", "HEAD").strip(), git("diff", "HEAD")
        untracked = git("ls-files", "--others", "--exclude-standard", "--", *CODE_FILES)
        body = (f"commit {commit}\n{untracked and 'untracked: ' + untracked}"
                f"git diff HEAD ({'none' if not diff else f'{diff.count(chr(10))} lines'}):\n{diff}")
    except (OSError, subprocess.CalledProcessError):
        body = "no git checkout: the source files follow\n" + "".join(
            f"{rule}\n{name}\n{rule}\n{(ROOT / name).read_text()}\n" for name in CODE_FILES)
    return f"{rule}\ncode that ran\n{body}{rule}\n"


def run_logged(command: list[str], log_path: Path, timeout: float, env: dict[str, str], header: str) -> dict[str, Any]:
    """Runs `command`, writing `header` and then its output to `log_path`; kills its process group after `timeout`
    seconds or when this process is terminated. Returns the exit code (124 on timeout), the wall time and when the
    first training step was logged."""
    started = time.time()
    first_step = None
    with open(log_path, "w") as log:
        log.write(header)
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                   cwd=ROOT, start_new_session=True)
        def kill(*_: Any) -> None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

        signal.signal(signal.SIGTERM, lambda *_: (kill(), sys.exit(124)))
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:  # a SIGTERM ends here too: a timer left running would keep Python from exiting until it fires
            for line in process.stdout:
                log.write(line)
                if first_step is None and line.startswith("step ") and "tok/s" in line:
                    first_step = time.time() - started
            process.wait()
            timed_out = not timer.is_alive()
        finally:
            timer.cancel()
    return {"rc": 124 if timed_out else process.returncode, "wall_seconds": time.time() - started,
            "first_step_wall_seconds": first_step}


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """03's metrics.jsonl: (step records, validation records)."""
    records = [json.loads(line) for line in open(path)] if path.exists() else []
    return [r for r in records if "loss" in r], [r for r in records if "val_bpb" in r]


def full_batch_tokens(steps: list[dict]) -> int | None:
    """Tokens in the run's last step: its full batch, also when 03's batch-size ramp (batch_start_tokens) made the
    first steps smaller."""
    if not steps:
        return None
    return steps[-1]["tokens"] - (steps[-2]["tokens"] if len(steps) > 1 else 0)


def first_at_or_below(val: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation (a record with step, tokens, train_seconds, val_bpb) at or below `target`; None if no
    evaluation got there."""
    return next((v for v in val if v["val_bpb"] <= target), None)


def summarize(run: dict[str, Any], target: float | None = None) -> dict[str, Any]:
    """Adds the derived figures to a run record with `step_seconds` (a list), `tokens_per_step` and `val`: steady
    state is the median step after the first (which compiles), compilation the first step minus that."""
    steady = statistics.median(run["step_seconds"][1:]) if len(run["step_seconds"]) > 1 else None
    first = run["step_seconds"][0] if run["step_seconds"] else None
    hit = first_at_or_below(run["val"], target) if target is not None else None
    return {**run, "steps_done": len(run["step_seconds"]), "first_step_seconds": first, "steady_step_seconds": steady,
            "tokens_per_second": run["tokens_per_step"] / steady if steady else None,
            "compile_seconds": first - steady if first and steady else None,
            "train_seconds": sum(run["step_seconds"]),
            "final_val_bpb": run["val"][-1]["val_bpb"] if run["val"] else None,
            "best_val_bpb": min(v["val_bpb"] for v in run["val"]) if run["val"] else None,
            "target_bpb": target, "target_step": hit and hit["step"],
            "target_seconds": hit and hit["train_seconds"]}


def spread(values: list[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation, minimum and maximum of the values that exist; n counts them, of `runs`."""
    have = [v for v in values if v is not None]
    return {"n": len(have), "runs": len(values), "mean": statistics.fmean(have) if have else None,
            "std": statistics.stdev(have) if len(have) > 1 else None,
            "min": min(have, default=None), "max": max(have, default=None)}


AGGREGATED = ("target_seconds", "target_step", "final_val_bpb", "best_val_bpb", "tokens_per_second",
              "first_step_seconds", "train_seconds")


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The spread over seeds of each figure in AGGREGATED. A seed that never reached the target has no time to it:
    `n` < `runs` says so, and the mean is over the seeds that did."""
    return {key: spread([run[key] for run in runs]) for key in AGGREGATED}


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def fmt_spread(stats: dict[str, Any], spec: str) -> str:
    """'mean ± std (min-max, n of runs)', with what is missing left out."""
    if stats["mean"] is None:
        return f"- (0 of {stats['runs']})"
    text = fmt(stats["mean"], spec)
    if stats["std"] is not None:
        text += f" ± {fmt(stats['std'], spec)} ({fmt(stats['min'], spec)} to {fmt(stats['max'], spec)})"
    return text + (f" ({stats['n']} of {stats['runs']} runs)" if stats["n"] < stats["runs"] else "")


def report_line(run: dict[str, Any]) -> str:
    steady_ms = run["steady_step_seconds"] and run["steady_step_seconds"] * 1e3
    curve = " ".join(f"{v['step']}:{v['val_bpb']:.4f}" for v in run["val"])
    return (f"{run['name']}: rc {run['rc']}, {run['steps_done']} steps | steady "
            f"{fmt(run['tokens_per_second'], ',.0f')} tok/s ({fmt(steady_ms, '.0f')} ms/step) | first step "
            f"{fmt(run['first_step_seconds'], '.1f')} s | peak {fmt(run['peak_memory_GB'], '.2f')} GB | "
            f"recompiles {run.get('recompiles', '-')} | val bpb {curve or '-'} | to {run['target_bpb']}: "
            f"{fmt(run['target_seconds'], '.1f')} s (step {fmt(run['target_step'], 'd')})")


def train_command(args: argparse.Namespace, name: str, seed: int, eval_tokens: int, extra: list[str]) -> list[str]:
    return [sys.executable, "notebooks/03_pretrain.py", f"--preset={args.preset}", f"--depth={args.depth}",
            f"--steps={args.steps}", f"--eval_every={args.eval_every}", f"--save_every={args.steps + 1}",
            f"--eval_batch_tokens={args.eval_batch_tokens}", f"--eval_tokens={eval_tokens}", "--resume=false",
            f"--seed={seed}", f"--run_name={name}", *extra]


def run_seed(args: argparse.Namespace, name: str, seed: int, eval_tokens: int, extra: list[str]) -> dict[str, Any]:
    """One run of 03 with this seed: its log and JSON in OUT, its figures returned."""
    run_name = f"{name}_seed{seed}"
    command = train_command(args, run_name, seed, eval_tokens, extra)
    metrics = sc.artifact_dir("runs") / run_name / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    log_path = args.out / f"{run_name}.log"
    print(f"{run_name}: {' '.join(command[1:])} (timeout {args.timeout:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="compile-cache-") as fresh:
        # Each seed compiles from nothing, as a user's first run does: the first step's time would otherwise depend
        # on what an earlier seed left in inductor's and Triton's caches. A sweep may share --compile_cache instead.
        cache = args.compile_cache or fresh
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_LOGS": os.environ.get("TORCH_LOGS", "recompiles"),
               "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
        run = run_logged(command, log_path, args.timeout, env, code_header())
    steps, val = read_metrics(metrics)
    result = summarize({
        "system": "ours", "name": run_name, "seed": seed, "depth": args.depth, "command": command[1:], **run,
        "tokens_per_step": full_batch_tokens(steps),
        "step_seconds": [r["step_seconds"] for r in steps],
        "val": [{k: r[k] for k in ("step", "tokens", "train_seconds", "val_bpb")} for r in val],
        "peak_memory_GB": steps[-1].get("peak_memory_GB") if steps else None, "eval_tokens": eval_tokens,
        "compile_cache": "shared" if args.compile_cache else "empty",
        "recompiles": log_path.read_text(errors="replace").count("Recompiling function"),
    }, args.target)
    (args.out / f"{run_name}.json").write_text(json.dumps(result, indent=1))
    print(report_line(result), flush=True)
    return result


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be integers separated by commas, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds repeats a seed: {text!r}")
    return seeds


def compile_cache_folder(text: str) -> Path:
    """--compile_cache as an absolute folder, made if missing: the runs start in the repository root, where a relative
    path would name another folder than the one given."""
    folder = Path(text).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"--compile_cache {text!r} is not a folder this user can write: "
                                         f"{error.strerror}") from None
    return folder


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train.jsonl.{xz,gz} and val.jsonl.gz")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--eval_batch_tokens", type=int, default=8192)
    parser.add_argument("--target", type=float, default=BOOKS_TARGET_BPB, help="val bpb the time is measured to")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated, run one after another")
    parser.add_argument("--preset", default="speedrun")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for each seed's run")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--name", default="", help="run name (default ours_d<depth>)")
    parser.add_argument("--compile_cache", type=compile_cache_folder, default=None,
                        help="compile cache kept across seeds and runs, for sweeps (first steps then count less than "
                             "a user's first run; records leave it unset)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    name = args.name or f"ours_d{args.depth}"
    args.out.mkdir(parents=True, exist_ok=True)
    prepare_artifacts(args.data, args.vocab_size, workers=min(8, os.cpu_count() or 1))
    eval_tokens = validation_rows(args.eval_batch_tokens) * args.eval_batch_tokens
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:  # the summary is rewritten after each seed, so a run cut short keeps the seeds it ran
        runs.append(run_seed(args, name, seed, eval_tokens, extra))
        summary = {"system": "ours", "name": name, "depth": args.depth, "data": str(args.data),
                   "target_bpb": args.target, "seeds": args.seeds, "spread": aggregate(runs), "runs": runs}
        (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    print(f"{name}, {len(runs)} of {len(args.seeds)} seeds: time to val bpb {args.target} "
          f"{fmt_spread(summary['spread']['target_seconds'], '.1f')} s, at step "
          f"{fmt_spread(summary['spread']['target_step'], '.1f')}; final val bpb "
          f"{fmt_spread(summary['spread']['final_val_bpb'], '.4f')}", flush=True)
    return summary


if __name__ == "__main__":
    main()
