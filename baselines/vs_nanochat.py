"""Side-by-side report of DecoderStack and nanochat runs: one table with ratios, val bpb curves, time to bpb.

    python3 baselines/vs_nanochat.py --out=$OUT --depths 12 20

Reads OUT/ours_d<depth>.json (bench_pretrain.py) and every OUT/peer*/nanochat_d<depth>_bf16.log (../shared/peer/
run.sh; OUT/peer is nanochat's defaults, other peer* folders are variants such as a shorter warm-up). Writes
OUT/vs_nanochat.md (the table), OUT/vs_nanochat.json and OUT/vs_nanochat_d<depth>.png. Both systems get the same
definitions: steady state is the median step after the first; compilation is the first step minus that; the
seconds of a curve are training seconds (the sum of step times, compilation included, evaluation excluded).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import fmt, summarize  # noqa: E402

TARGET_TIME_RATIO = 0.6  # the issue's target: ours reaches nanochat's final bpb in at most 0.6x its time


def parse_nanochat_log(path: Path) -> dict[str, Any]:
    """A run record (bench_pretrain's layout) from nanochat's base_train log."""
    text = path.read_text(errors="replace")
    step_seconds = [float(ms) / 1e3 for ms in re.findall(r"^step \d+/\d+ .*?\| dt: ([\d.]+)ms", text, re.M)]
    batch = re.search(r"Total batch size ([\d,]+)", text)
    tokens_per_step = int(batch.group(1).replace(",", "")) if batch else None
    val = [{"step": int(step), "tokens": int(step) * (tokens_per_step or 0),
            "train_seconds": sum(step_seconds[:int(step)]), "val_bpb": float(bpb)}
           for step, bpb in re.findall(r"^Step (\d+) \| Validation bpb: ([\d.]+)", text, re.M)]
    peak = re.search(r"Peak memory usage: ([\d.]+)MiB", text)
    name = "defaults" if path.parent.name == "peer" else path.parent.name.replace("peer_warmup", "warm-up ")
    return summarize({"system": "nanochat", "name": name, "log": str(path), "step_seconds": step_seconds,
                      "tokens_per_step": tokens_per_step, "val": val, "finished": "Total training time" in text,
                      "peak_memory_GB": float(peak.group(1)) * 2**20 / 1e9 if peak else None})


def seconds_to_reach(run: dict[str, Any], target: float, without_compile: bool = False) -> float | None:
    """Training seconds at the first evaluation with val bpb <= target (None if none), optionally without the
    compilation time."""
    hit = next((v for v in run["val"] if v["val_bpb"] <= target), None)
    if hit is None:
        return None
    compile_seconds = (run["compile_seconds"] or 0.0) if without_compile else 0.0
    return max(hit["train_seconds"] - compile_seconds, 0.0)


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def depth_rows(depth: int, ours: dict[str, Any] | None, peers: list[dict[str, Any]]) -> list[str]:
    """Markdown table rows for one depth: ours against the nanochat run with the lowest final bpb."""
    finished = [p for p in peers if p["final_val_bpb"] is not None]
    peer = min(finished, key=lambda p: p["final_val_bpb"]) if finished else (peers[0] if peers else None)
    get = lambda run, key: None if run is None else run.get(key)
    figures = [("steady tokens/s", "tokens_per_second", ",.0f"), ("step time, s (median after the first)",
               "steady_step_seconds", ".3f"), ("peak memory, GB", "peak_memory_GB", ".1f"),
               ("first step, s", "first_step_seconds", ".1f"), ("compilation, s (first step - median)",
               "compile_seconds", ".1f"), ("final val bpb", "final_val_bpb", ".4f")]
    rows = [f"| d{depth} {label} | {fmt(get(ours, key), spec)} | {fmt(get(peer, key), spec)} | "
            f"{ratio(get(ours, key), get(peer, key))} |" for label, key, spec in figures]
    rows.append(f"| d{depth} steps done (nanochat run) | {fmt(get(ours, 'steps_done'), 'd')} | "
                f"{fmt(get(peer, 'steps_done'), 'd')} ({get(peer, 'name') or '-'}) | |")
    target = get(peer, "final_val_bpb")
    if ours and ours["val"] and target is not None:
        for without in (False, True):
            mine, theirs = seconds_to_reach(ours, target, without), seconds_to_reach(peer, target, without)
            label = "without compilation" if without else "compilation counted"
            verdict = ratio(mine, theirs)
            met = "" if mine is None or not theirs else (" met" if mine / theirs <= TARGET_TIME_RATIO else " missed")
            rows.append(f"| d{depth} training s to nanochat's final bpb {target:.4f} ({label}) | {fmt(mine, '.1f')} "
                        f"{'(not reached)' if mine is None else ''} | {fmt(theirs, '.1f')} | {verdict}{met} |")
    for other in peers:
        if other is not peer:
            rows.append(f"| d{depth} nanochat {other['name']}: final val bpb, steady tokens/s | | "
                        f"{fmt(other['final_val_bpb'], '.4f')}, {fmt(other['tokens_per_second'], ',.0f')} | |")
    return rows


def plot(depth: int, runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_tokens, by_seconds) = plt.subplots(1, 2, figsize=(12, 4))
    for run in runs:
        label = f"nanochat {run['name']}" if run["system"] == "nanochat" else "DecoderStack"
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
        runs = [run for run in (ours, *peers) if run and run["val"]]
        if runs:
            plot(depth, runs, args.out / f"vs_nanochat_d{depth}.png")
        report[f"d{depth}"] = {"ours": ours, "nanochat": peers}
    table = "\n".join(lines)
    (args.out / "vs_nanochat.md").write_text(table + "\n")
    (args.out / "vs_nanochat.json").write_text(json.dumps(report, indent=1))
    print(table)


if __name__ == "__main__":
    main()
