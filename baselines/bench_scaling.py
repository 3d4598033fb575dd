"""One GPU against two (issue 23): the twins themselves, a few steps each, run once as one process and once under
`torchrun --standalone --nproc_per_node=N`, with the throughput each run writes, side by side.

Stages, in order, with the figure read from each run and the target of two processes against one:

- pretrain, 03_pretrain: `summary.json` tokens_per_second (the median of the steps after the first, which
  compiles); target 1.9x;
- core, 04_core_eval: `summary.json` tokens_per_second (the packed pass, after 04's warm-up pass); target 1.8x;
- sft, 05_sft: the median `tokens_per_second` in `metrics.jsonl` of the steps after the first; target 1.9x;
- rl, 06_rl: rollouts per second, prompts x samples over the median `rollout_seconds + update_seconds` of the steps
  after the first; target 1.9x.

05 fine-tunes the one-process run of 03 and 06 starts from the one-process run of 05, so both of a stage's runs
start from the same weights. No figure counts the first step (04: its warm-up pass), so what the one-process run
left in inductor's compile cache changes only the torchrun run's wall time. The runs are called
`scaling_<stage>_<k>gpu` in STACK_HOME; a stage's old run folders and checkpoints of that name are removed first, so
nothing is resumed.

STACK_HOME needs the tokenizer and the pretraining shards: --data=BOOKS makes them as bench_pretrain.py does. The
SFT and GSM8K shards (and CORE's, with --core_bundle) are made if missing, offline, by 02_sharding run in a scratch
STACK_HOME that shares the tokenizer (so the pretraining shards are left alone): GSM8K from --gsm8k (a folder of
train.jsonl and test.jsonl, or "synthetic"), the SFT mixture of GSM8K, spelling (the built-in words) and identity
conversations, plus the Hub sources only where --sft_local_dir holds their copies.

    python3 baselines/bench_scaling.py --gsm8k=DATA/gsm8k --out=OUT                        # 2 GPUs, depth 20
    python3 baselines/bench_scaling.py --data=DATA/books --gsm8k=DATA/gsm8k --core_bundle=DATA/core \\
        --stages=pretrain,core,sft,rl
    CUDA_VISIBLE_DEVICES= python3 baselines/bench_scaling.py --preset=tiny --depth=2 --data=CORPUS \\
        --vocab_size=512 --stages=pretrain,core,sft,rl --set=sft:--micro_tokens=1024   # CPU: two gloo processes

Each run's log is OUT/<stage>_<k>gpu.log (starting with the code that ran), 02's is OUT/prepare_02_sharding.log.
OUT/scaling.json holds every run's figures and command, OUT/scaling.md the table. A run that fails or passes
--timeout stops the bench with a line naming the stage and its log; what ran before it is written first.
--prepare_only makes the shards and stops: where each command has a time limit, prepare in one, measure in the next.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pretrain import code_header, prepare_artifacts, run_logged  # noqa: E402

import stackcore as sc  # noqa: E402
from data.core import write_synthetic_bundle  # noqa: E402


@dataclass(frozen=True)
class Stage:
    name: str
    twin: str
    target: float  # N processes against one, for N=2 (issue 23)
    unit: str  # what the figure counts
    needs: str = ""  # the stage whose one-process checkpoint this one starts from


STAGES = {stage.name: stage for stage in (
    Stage("pretrain", "notebooks/03_pretrain.py", 1.9, "tokens/s"),
    Stage("core", "notebooks/04_core_eval.py", 1.8, "tokens/s", needs="pretrain"),
    Stage("sft", "notebooks/05_sft.py", 1.9, "tokens/s", needs="pretrain"),
    Stage("rl", "notebooks/06_rl.py", 1.9, "rollouts/s", needs="sft"),
)}
CHAT_SHARDS = ("sft/train_000000.bin", "gsm8k/train.bin", "gsm8k/test.bin")  # what 05 and 06 read


def run_name(stage: str, processes: int) -> str:
    return f"scaling_{stage}_{processes}gpu"


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def positive_seconds(text: str) -> float:
    """A finite number of seconds above 0 (--timeout: 0, a negative value or nan would end every run at once)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return seconds


def stage_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--stages takes some of {', '.join(STAGES)}, got {text!r}")
    return [name for name in STAGES if name in names]  # the order the stages depend on each other


def stage_setting(text: str) -> tuple[str, str]:
    """--set=STAGE:--name=value: one more option for both runs of a stage."""
    stage, _, option = text.partition(":")
    if stage not in STAGES or not option.startswith("--"):
        raise argparse.ArgumentTypeError(f"--set takes STAGE:--name=value with STAGE one of {', '.join(STAGES)}, "
                                         f"got {text!r}")
    return stage, option


def check_plan(args: argparse.Namespace) -> None:
    """Stop before any work when a stage would start from a checkpoint nobody makes, or 04 has no CORE tasks."""
    checkpoints = sc.artifact_dir("checkpoints")
    for name in args.stages:
        needs = STAGES[name].needs
        if needs and needs not in args.stages and sc.latest_checkpoint(checkpoints / run_name(needs, 1)) is None:
            raise SystemExit(f"stage {name} starts from stage {needs}'s one-process checkpoint, and "
                             f"{checkpoints / run_name(needs, 1)} has none: add {needs} to --stages")
    core_ready = (sc.artifact_dir("shards") / "core").is_dir()
    if "core" in args.stages and not (core_ready or args.core_bundle or args.preset == "tiny"):
        raise SystemExit("stage core needs CORE shards in STACK_HOME/shards/core: pass --core_bundle=FOLDER (a "
                         "folder with eval_data/) or leave core out of --stages")


def sharding_args(args: argparse.Namespace, core_bundle: str) -> list[str]:
    """02_sharding's options for an offline run: a few synthetic pretraining documents (thrown away with the
    scratch home), the GSM8K folder for the RL prompts and the SFT mixture, no Hub download."""
    hub_sources = [] if args.sft_local_dir else ["--sft_smoltalk=0", "--sft_mmlu=0", "--sft_arc_easy=0",
                                                 "--sft_arc_challenge=0"]
    return [f"--preset={args.preset}", "--corpus=synthetic", "--max_chars=200000", "--val_docs=8",
            f"--rl_gsm8k_source={args.gsm8k}", f"--sft_gsm8k_source={args.gsm8k}", "--sft_words=builtin",
            f"--sft_local_dir={args.sft_local_dir}", *hub_sources,
            *([f"--core_bundle={core_bundle}"] if core_bundle else [])]


def prepare_chat_shards(args: argparse.Namespace) -> None:
    """SFT and GSM8K shards (and CORE's from --core_bundle) into STACK_HOME, unless they are there, by 02_sharding in
    a scratch STACK_HOME whose tokenizer is this one's."""
    shards = sc.artifact_dir("shards")
    want_core = "core" in args.stages and (args.core_bundle or args.preset == "tiny")
    missing = [name for name in CHAT_SHARDS if not (shards / name).is_file()]
    if not missing and not (want_core and not (shards / "core").is_dir()):
        return
    scratch = sc.stack_home() / "scaling_scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    (scratch / "tokenizer").symlink_to(sc.artifact_dir("tokenizer").resolve(), target_is_directory=True)
    # 02 always writes CORE shards: without --core_bundle (outside the tiny preset, which makes its own tasks) it
    # gets generated tasks, so that it needs no download; those shards stay in the scratch home.
    bundle = args.core_bundle or ("" if args.preset == "tiny" else str(write_synthetic_bundle(scratch / "core")))
    command = [sys.executable, "notebooks/02_sharding.py", *sharding_args(args, bundle)]
    log_path = args.out / "prepare_02_sharding.log"
    print(f"prepare: {' '.join(command[1:])}", flush=True)
    env, header = {**os.environ, "PYTHONUNBUFFERED": "1", "STACK_HOME": str(scratch)}, code_header()
    run = run_logged(command, log_path, args.timeout, env, header)
    if run["rc"]:
        raise SystemExit(failure_line("prepare (02_sharding)", run["rc"], log_path, args.timeout, header))
    for name in ("sft", "gsm8k", *(["core"] if want_core else [])):
        shutil.rmtree(shards / name, ignore_errors=True)
        shutil.move(str(scratch / "shards" / name), shards / name)
    shutil.rmtree(scratch)


def twin_args(stage: str, args: argparse.Namespace, processes: int) -> list[str]:
    """The options of one run: few steps, evaluations cut to one small pass, one checkpoint at the end."""
    common = [f"--preset={args.preset}", "--resume=false"]
    if stage == "pretrain":
        steps = args.pretrain_steps
        return [*common, f"--depth={args.depth}", f"--steps={steps}", f"--eval_every={steps}",
                f"--save_every={steps}", "--eval_tokens=1", f"--run_name={run_name(stage, processes)}"]
    if stage == "core":  # 04 runs no optimizer: --resume is not its setting; --benchmark times a warm-up pass apart
        return [common[0], f"--run_name={run_name('pretrain', 1)}", "--benchmark=true", "--compare_examples=1"]
    if stage == "sft":
        return [*common, f"--base_run={run_name('pretrain', 1)}", f"--steps={args.sft_steps}",
                f"--eval_every={args.sft_steps}", f"--save_every={args.sft_steps}", "--eval_steps=1",
                "--chat_tasks=colours", "--chat_choice_examples=32", f"--run_name={run_name(stage, processes)}"]
    start = sc.latest_checkpoint(sc.artifact_dir("checkpoints") / run_name("sft", 1))
    return [*common, f"--checkpoint={start}", f"--steps={args.rl_steps}", f"--eval_every={args.rl_steps}",
            f"--save_every={args.rl_steps}", f"--eval_prompts={2 * args.nproc}", "--eval_samples=2",
            f"--run_name={run_name(stage, processes)}"]


def launcher(processes: int) -> list[str]:
    """One process, or torchrun's (python3 -m torch.distributed.run is what the torchrun command runs)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def after_first(values: list[float]) -> float | None:
    """The median of the values after the first step's (which compiles or warms up), None with fewer than two."""
    return statistics.median(values[1:]) if len(values) > 1 else None


def throughput(stage: str, processes: int) -> dict[str, Any]:
    """What one run wrote: its figure (`per_second`, None where the run wrote none) and what it came from."""
    folder = sc.artifact_dir("runs") / (run_name(stage, processes) if stage != "core" else "04_core_eval")
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else {}
    found = {"ranks": summary.get("ranks"), "device": summary.get("device"), "attention": summary.get("attention")}
    if stage in ("pretrain", "core"):
        return {"per_second": summary.get("tokens_per_second"), **found}
    steps = [r for r in read_jsonl(folder / "metrics.jsonl") if "loss" in r]  # evaluations have no training loss
    if stage == "sft":
        return {"per_second": after_first([r["tokens_per_second"] for r in steps]), "steps": len(steps), **found}
    rollout = after_first([r["rollout_seconds"] for r in steps])
    update = after_first([r["update_seconds"] for r in steps])
    rollouts = summary.get("prompts_per_step", 0) * summary.get("samples_per_prompt", 0)
    return {"per_second": rollouts / (rollout + update) if rollout is not None and rollouts else None,
            "rollout_seconds": rollout, "update_seconds": update, "rollouts_per_step": rollouts, "steps": len(steps),
            **found}


def failure_line(what: str, rc: int, log_path: Path, timeout: float, header: str) -> str:
    """Which stage failed and where its log is, with the first error line of its output after `header`, the code
    that ran (the twin's own message comes before torchrun's report), or, without one, its last lines."""
    cause = f"timed out after {timeout:.0f} s" if rc == 124 else f"exit status {rc}"
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    lines = text.removeprefix(header).splitlines()
    errors = [line for line in lines if re.search(r"\w(Error|Exception)\b|\berror:", line)]
    shown = errors[:1] or lines[-6:]
    return "\n".join([f"bench_scaling: {what} failed ({cause}); log: {log_path}", *("    " + line for line in shown)])


def run_stage(stage: str, processes: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of a stage's twin, from a clean run folder; its figures, or SystemExit naming the stage and log."""
    name = run_name(stage, processes)
    for folder in (sc.artifact_dir("runs") / name, sc.artifact_dir("checkpoints") / name,
                   *([sc.artifact_dir("runs") / "04_core_eval"] if stage == "core" else [])):
        shutil.rmtree(folder, ignore_errors=True)
    extra = [option for target, option in args.set if target == stage]  # after ours: a twin takes the last
    command = [*launcher(processes), STAGES[stage].twin, *twin_args(stage, args, processes), *extra]
    log_path = args.out / f"{stage}_{processes}gpu.log"
    print(f"{stage}, {processes} process(es): {' '.join(command[1:])} (timeout {args.timeout:.0f} s)", flush=True)
    header = code_header()
    run = run_logged(command, log_path, args.timeout, {**os.environ, "PYTHONUNBUFFERED": "1"}, header)
    if run["rc"]:
        raise SystemExit(failure_line(f"stage {stage} on {processes} process(es)", run["rc"], log_path, args.timeout,
                                      header))
    result = {"stage": stage, "processes": processes, "command": command[1:], "log": str(log_path),
              "wall_seconds": round(run["wall_seconds"], 1), **throughput(stage, processes)}
    if processes > 1:  # no stage starts from a torchrun run: drop its weights and optimizer state
        shutil.rmtree(sc.artifact_dir("checkpoints") / name, ignore_errors=True)
    if not result["per_second"]:
        raise SystemExit(f"bench_scaling: stage {stage} on {processes} process(es) wrote no throughput "
                         f"(too few steps?); log: {log_path}")
    print(f"{stage}, {processes} process(es): {result['per_second']:,.1f} {STAGES[stage].unit}, "
          f"{result['wall_seconds']:.0f} s wall", flush=True)
    return result


def comparisons(runs: list[dict[str, Any]], nproc: int) -> list[dict[str, Any]]:
    """Per stage with both runs done: one process, nproc, their ratio and the target."""
    by_key = {(run["stage"], run["processes"]): run for run in runs}
    rows = []
    for name, stage in STAGES.items():
        if (name, 1) in by_key and (name, nproc) in by_key:
            one, many = by_key[name, 1]["per_second"], by_key[name, nproc]["per_second"]
            rows.append({"stage": name, "twin": Path(stage.twin).stem, "unit": stage.unit, "one": one,
                         "many": many, "ratio": many / one, "target": stage.target if nproc == 2 else None})
    return rows


def markdown_table(rows: list[dict[str, Any]], nproc: int) -> str:
    lines = [f"| twin | unit | 1 process | {nproc} processes | ratio | target | met |", "| --- " * 7 + "|"]
    for row in rows:
        target = "-" if row["target"] is None else f"{row['target']:.1f}x"
        met = "-" if row["target"] is None else ("yes" if row["ratio"] >= row["target"] else "no")
        lines.append(f"| {row['twin']} | {row['unit']} | {row['one']:,.1f} | {row['many']:,.1f} | "
                     f"{row['ratio']:.2f}x | {target} | {met} |")
    return "\n".join(lines) + "\n"


def write_results(args: argparse.Namespace, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """OUT/scaling.json and OUT/scaling.md from the runs done so far."""
    rows = comparisons(runs, args.nproc)
    results = {"preset": args.preset, "depth": args.depth, "nproc": args.nproc, "stages": args.stages,
               "steps": {"pretrain": args.pretrain_steps, "sft": args.sft_steps, "rl": args.rl_steps},
               "comparisons": rows, "runs": runs}
    (args.out / "scaling.json").write_text(json.dumps(results, indent=1))
    (args.out / "scaling.md").write_text(markdown_table(rows, args.nproc))
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=stage_list, default=["pretrain", "sft", "rl"],
                        help=f"comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes of the torchrun runs")
    parser.add_argument("--preset", default="speedrun")
    parser.add_argument("--depth", type=positive_int, default=20)
    parser.add_argument("--pretrain_steps", type=positive_int, default=4)
    parser.add_argument("--sft_steps", type=positive_int, default=4)
    parser.add_argument("--rl_steps", type=positive_int, default=3)
    parser.add_argument("--set", type=stage_setting, action="append", default=[], metavar="STAGE:--NAME=VALUE",
                        help="an option for both runs of a stage, e.g. sft:--micro_tokens=32768 (repeatable)")
    parser.add_argument("--gsm8k", default="synthetic", help="folder with train.jsonl and test.jsonl, or synthetic")
    parser.add_argument("--sft_local_dir", default="", help="local copies of the Hub's SFT sources (02's option)")
    parser.add_argument("--core_bundle", default="", help="folder with CORE's eval_data/ (for stage core)")
    parser.add_argument("--data", type=Path, help="books folder: make the tokenizer and pretraining shards first")
    parser.add_argument("--vocab_size", type=positive_int, default=32768, help="with --data")
    parser.add_argument("--prepare_only", action="store_true", help="make the shards the stages read, run none")
    parser.add_argument("--timeout", type=positive_seconds, default=300, help="seconds for each run")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-out")))
    args = parser.parse_args(argv)
    if args.nproc < 2:  # before --data's tokenizer and shards, which take minutes
        parser.error("--nproc must be at least 2: the bench compares one process with --nproc")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.data:
        prepare_artifacts(args.data, args.vocab_size, workers=min(8, os.cpu_count() or 1))
    sc.require_artifact(sc.artifact_dir("tokenizer") / sc.TOKENIZER_META, made_by="01_tokenizer (or pass --data)")
    check_plan(args)
    prepare_chat_shards(args)
    if args.prepare_only:
        print(f"shards ready in {sc.artifact_dir('shards')}", flush=True)
        return {}
    runs: list[dict[str, Any]] = []
    for stage in args.stages:
        for processes in (1, args.nproc):
            try:
                runs.append(run_stage(stage, processes, args))
            finally:  # a failed run leaves the table of the runs before it
                results = write_results(args, runs)
    print(markdown_table(results["comparisons"], args.nproc) + f"written {args.out / 'scaling.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()
