"""The report card, as nanochat's report.md: STACK_HOME/report.md gathers what each notebook left in its run folder
(summary.json and the figures beside it), so a learner can keep and share what their run achieved. A notebook not run
yet gets a line that says so. The run folders are the notebooks' default run names. The pipeline
(`python3 stackcore.py pipeline`) writes it at its end, and 07_chat's last cell shows it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

from notebooks.runtime import project_commit


def format_duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Lines of a Markdown table; floats print with 4 significant digits."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _report_tokenizer(summary: dict[str, Any]) -> list[str]:
    return [f"Vocabulary of {summary['vocab_size']:,} tokens trained on {summary['train_chars']:,} characters.", "",
            *markdown_table(("encoding", "bytes per token on held-out text"), summary["bytes_per_token"].items())]


def _report_shards(summary: dict[str, Any]) -> list[str]:
    rows = [(split, summary[split]["shards"], summary[split]["tokens"], summary[split]["documents"])
            for split in ("train", "val")]
    return markdown_table(("split", "shards", "tokens", "documents"), rows)


def _report_pretraining(summary: dict[str, Any]) -> list[str]:
    keys = ("parameters", "steps", "tokens", "final_val_bpb", "tokens_per_second", "mfu", "peak_memory_GB")
    return markdown_table(("", "value"), ((key, summary[key]) for key in keys if summary.get(key) is not None))


def _report_core(summary: dict[str, Any]) -> list[str]:
    rows = ((label, task["examples"], task["accuracy"], task["baseline"], task["centered"])
            for label, task in summary["tasks"].items())
    scored = Path(summary.get("checkpoint", ""))  # 04 evaluates any run's checkpoint; its summary is not per run
    of = f" of `{scored.parent.name}/{scored.name}`" if scored.name else ""
    return [f"CORE **{summary['core']:.4f}**{of} at step {summary['step']}; validation bits per byte "
            f"{summary['val_bpb']:.4f}.", "",
            *markdown_table(("task", "examples", "accuracy", "baseline", "centred"), rows)]


def _report_sft(summary: dict[str, Any]) -> list[str]:
    stages = summary["chat"]
    tasks = dict.fromkeys(name for stage in stages.values() for name in stage["tasks"])
    rows = [(name, *(stage["tasks"].get(name, {}).get("accuracy", "-") for stage in stages.values())) for name in tasks]
    rows.append(("ChatCORE", *(stage["chatcore"] for stage in stages.values())))
    return [f"{summary['steps']} steps, final validation loss {summary['final_val_loss']:.4f}. Chat evals "
            f"(accuracy per task, before and after):", "", *markdown_table(("task", *stages), rows)]


def _report_rl(summary: dict[str, Any]) -> list[str]:
    start, final = summary["pass_at_k_start"], summary["pass_at_k_final"]
    return [f"{summary['steps']} steps of {summary['prompts_per_step']} GSM8K questions x "
            f"{summary['samples_per_prompt']} answers.", "",
            *markdown_table(("GSM8K (test)", "before RL", "after RL"), ((k, start[k], final.get(k)) for k in start))]


REPORT_RUNS = (("01 · Tokenizer", "01_tokenizer", _report_tokenizer), ("02 · Shards", "02_sharding", _report_shards),
               ("03 · Pretraining", "pretrain", _report_pretraining), ("04 · CORE", "04_core_eval", _report_core),
               ("05 · Supervised fine-tuning", "sft", _report_sft), ("06 · Reinforcement learning", "rl", _report_rl))
REPORT_SECONDS = ("train_seconds", "seconds", "rollout_seconds", "update_seconds")  # the timings a summary may hold


def write_report(home: Path) -> Path:
    """Write `home/report.md`: per notebook its summary's key figures and its plots (or "not run"), then the
    timings, the hardware each notebook ran on, and the commit. Returns the path."""
    home = Path(home)
    lines = ["# DecoderStack report card", "",
             f"Written {time.strftime('%Y-%m-%d %H:%M')} at commit {project_commit()}.", ""]
    timings, devices = [], {}
    for title, folder, section in REPORT_RUNS:
        run_dir = home / "runs" / folder
        lines += [f"## {title}", ""]
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
            lines += section(summary)
        except FileNotFoundError:
            lines += [f"Not run (no `runs/{folder}/summary.json`).", ""]
            continue
        except (ValueError, KeyError, TypeError) as error:
            lines += [f"`runs/{folder}/summary.json` is unreadable ({type(error).__name__}: {error}).", ""]
            continue
        lines += ["", *(f"![{folder} {png.stem}](runs/{folder}/{png.name})" for png in sorted(run_dir.glob("*.png"))),
                  ""]
        timings += [(title, key, summary[key]) for key in REPORT_SECONDS if summary.get(key) is not None]
        if "device" in summary:
            devices[title] = (f"{summary['device']} x {summary.get('ranks', 1)}, preset {summary['preset']}, "
                              f"attention {summary['attention']}")
    lines += ["## Timings", "", *markdown_table(("notebook", "what", "seconds"), timings), "",
              "## Hardware", "", *markdown_table(("notebook", "device x ranks, preset, attention"), devices.items())]
    home.mkdir(parents=True, exist_ok=True)
    path = home / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
