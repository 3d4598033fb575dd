"""Side-by-side report of DecoderStack and nanochat runs: one table with ratios, val bpb curves, time to bpb.

    python3 baselines/vs_nanochat.py --out=$OUT --depths 12

Reads OUT/ours_d<depth>.json (bench_pretrain.py: one run per seed and their spread) and every
OUT/peer*/nanochat_d<depth>_bf16.log (nanochat's base_train, run by the peer's run.sh; OUT/peer is nanochat's
defaults, other peer* folders are variants such as a shorter warm-up). Writes OUT/vs_nanochat.md (the table),
OUT/vs_nanochat.json and OUT/vs_nanochat_d<depth>.png. Both systems get the same definitions: steady state is the
median step after the first; compilation is the first step minus that; the seconds of a curve are training seconds
(the sum of step times, compilation included, evaluation excluded). The comparison's bar is nanochat's best val bpb
(the lowest of its evaluations, of the variant with the lowest): the time each system takes to reach it, ours as a
mean and spread over seeds; and our time to our own target beside it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import first_at_or_below, fmt, fmt_spread, spread, summarize  # noqa: E402

TARGET_TIME_RATIO = 0.3  # issue 21's target: ours reaches nanochat's best bpb in at most 0.3x its time


def parse_nanochat_log(path: Path) -> dict[str, Any]:
    """A run record (bench_pretrain's layout) from nanochat's base_train log, timed to its own best val bpb."""
    text = path.read_text(errors="replace")
    step_seconds = [float(ms) / 1e3 for ms in re.findall(r"^step \d+/\d+ .*?\| dt: ([\d.]+)ms", text, re.M)]
    batch = re.search(r"Total batch size ([\d,]+)", text)
    tokens_per_step = int(batch.group(1).replace(",", "")) if batch else None
    val = [{"step": int(step), "tokens": int(step) * (tokens_per_step or 0),
            "train_seconds": sum(step_seconds[:int(step)]), "val_bpb": float(bpb)}
           for step, bpb in re.findall(r"^Step (\d+) \| Validation bpb: ([\d.]+)", text, re.M)]
    peak = re.search(r"Peak memory usage: ([\d.]+)MiB", text)
    name = "defaults" if path.parent.name == "peer" else path.parent.name.replace("peer_warmup", "warm-up ")
    best = min((v["val_bpb"] for v in val), default=None)
    return summarize({"system": "nanochat", "name": name, "log": str(path), "step_seconds": step_seconds,
                      "tokens_per_step": tokens_per_step, "val": val, "finished": "Total training time" in text,
                      "peak_memory_GB": float(peak.group(1)) * 2**20 / 1e9 if peak else None}, best)


def seconds_to(run: dict[str, Any], bpb: float, without_compile: bool = False) -> float | None:
    """Training seconds at the run's first evaluation at or below `bpb` (None if none), optionally without the
    compilation time."""
    hit = first_at_or_below(run["val"], bpb)
    if hit is None:
        return None
    compile_seconds = (run["compile_seconds"] or 0.0) if without_compile else 0.0
    return max(hit["train_seconds"] - compile_seconds, 0.0)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def depth_rows(depth: int, ours: dict[str, Any] | None, peers: list[dict[str, Any]]) -> list[str]:
    """Markdown table rows for one depth: our seeds (mean and spread) against the nanochat run with the lowest
    best bpb."""
    runs = ours["runs"] if ours else []
    evaluated = [p for p in peers if p["best_val_bpb"] is not None]
    peer = min(evaluated, key=lambda p: p["best_val_bpb"]) if evaluated else (peers[0] if peers else None)
    theirs = lambda key: None if peer is None else peer.get(key)
    figures = [("steady tokens/s", "tokens_per_second", ",.0f"), ("step time, s (median after the first)",
               "steady_step_seconds", ".3f"), ("peak memory, GB", "peak_memory_GB", ".1f"),
               ("first step, s", "first_step_seconds", ".1f"), ("compilation, s (first step - median)",
               "compile_seconds", ".1f"), ("final val bpb", "final_val_bpb", ".4f"),
               ("best val bpb", "best_val_bpb", ".4f")]
    rows = []
    for label, key, spec in figures:
        mine = spread([run[key] for run in runs])
        rows.append(f"| d{depth} {label} | {fmt_spread(mine, spec)} | {fmt(theirs(key), spec)} | "
                    f"{ratio(mine['mean'], theirs(key))} |")
    seeds = ", ".join(f"{run['seed']} ({run['steps_done']})" for run in runs) or "-"
    rows.append(f"| d{depth} runs: seeds (steps done) / nanochat variant (steps done) | {seeds} | "
                f"{theirs('name') or '-'} ({fmt(theirs('steps_done'), 'd')}) | |")
    bar = theirs("best_val_bpb")
    for without in (False, True) if runs and bar is not None else ():
        mine = spread([seconds_to(run, bar, without) for run in runs])
        other = seconds_to(peer, bar, without)
        met = "" if mine["mean"] is None or not other else (
            " met" if mine["mean"] / other <= TARGET_TIME_RATIO else " missed")
        label = "without compilation" if without else "compilation counted"
        rows.append(f"| d{depth} training s to nanochat's best bpb {bar:.4f} ({label}) | {fmt_spread(mine, '.1f')} | "
                    f"{fmt(other, '.1f')} | {ratio(mine['mean'], other)}{met} |")
    if ours:
        target = ours["target_bpb"]
        rows.append(f"| d{depth} training s to the target {target} (compilation counted) | "
                    f"{fmt_spread(ours['spread']['target_seconds'], '.1f')} | "
                    f"{fmt(peer and seconds_to(peer, target), '.1f')} | |")
    for other in peers:
        if other is not peer:
            rows.append(f"| d{depth} nanochat {other['name']}: best val bpb, steady tokens/s | | "
                        f"{fmt(other['best_val_bpb'], '.4f')}, {fmt(other['tokens_per_second'], ',.0f')} | |")
    return rows


def plot(depth: int, runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_seconds) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        label = f"nanochat {run['name']}" if run["system"] == "nanochat" else f"DecoderStack, seed {run['seed']}"
        tokens = [v["tokens"] / 1e6 for v in run["val"]]
        bpb = [v["val_bpb"] for v in run["val"]]
        line, = by_tokens.plot(tokens, bpb, marker="o", label=label)
        seconds = [v["train_seconds"] for v in run["val"]]
        compile_seconds = run["compile_seconds"] or 0.0
        by_seconds.plot(seconds, bpb, marker="o", color=line.get_color(),
                        label=f"{label}, compilation {compile_seconds:.0f} s counted")
        by_seconds.plot([max(s - compile_seconds, 0.0) if s else 0.0 for s in seconds], bpb, ls="--",
                        color=line.get_color(), label=f"{label}, compilation left out")
    by_tokens.set(xlabel="training tokens (M)", ylabel="val bits per byte", title=f"d{depth}: val bpb by tokens")
    by_seconds.set(xlabel="training seconds (sum of step times; evaluation left out)", ylabel="val bits per byte",
                   title=f"d{depth}: val bpb by time")
    for axis in (by_tokens, by_seconds):
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--depths", type=int, nargs="+", default=[12])
    args = parser.parse_args()
    lines = ["| figure | DecoderStack | nanochat | ours / nanochat |", "| --- | --- | --- | --- |"]
    report = {}
    for depth in args.depths:
        ours_path = args.out / f"ours_d{depth}.json"
        ours = json.loads(ours_path.read_text()) if ours_path.exists() else None
        peers = [parse_nanochat_log(p) for p in sorted(args.out.glob(f"peer*/nanochat_d{depth}_bf16.log"))]
        lines += depth_rows(depth, ours, peers)
        runs = [run for run in (*(ours["runs"] if ours else []), *peers) if run["val"]]
        if runs:
            plot(depth, runs, args.out / f"vs_nanochat_d{depth}.png")
        report[f"d{depth}"] = {"ours": ours, "nanochat": peers}
    table = "\n".join(lines)
    (args.out / "vs_nanochat.md").write_text(table + "\n")
    (args.out / "vs_nanochat.json").write_text(json.dumps(report, indent=1))
    print(table)


if __name__ == "__main__":
    main()
