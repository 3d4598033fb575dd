"""A run of a training notebook (03_pretrain, 05_sft, 06_rl) around its loop: where it starts (afresh, or from the
newest usable checkpoint on any number of ranks, falling back past damaged ones; "already complete"; refused when
its length or its starting weights changed), saving its checkpoints (the newest few kept) with the totals a
summary adds up over sessions, stopping on a non-finite loss, and its metrics log; and 03's growing window and
batch. Only these three notebooks train, so this lives beside them; stackcore keeps the checkpoint reader
(load_checkpoint, model_from_checkpoint) that 04-07 use too, and the optimizer's schedules that 03 and 05 share."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from stackcore import (GPT, CheckpointError, ConfigError, DamagedCheckpointError, DistInfo, GPTConfig, PretrainLoader,
                       all_ranks_agree, checkpoint_paths, load_checkpoint, make_writable_folder, read_shard,
                       saved_model_config, sum_over_ranks)

REPLACED = "replaced"  # where a run started over keeps the earlier run's files until its own first checkpoint


def short_window_schedule(step: int, total_steps: int, final_window: int, start_window: int = 128,
                          granularity: int = 128) -> int:
    """The short window grown linearly, as in modded-nanogpt, down to whole `granularity`s: few recompiles and masks."""
    window = start_window + (final_window - start_window) * min(1.0, step / max(total_steps, 1))
    return max(start_window, min(final_window, int(window) // granularity * granularity))


def batch_size_schedule(step: int, final_tokens: int, start_tokens: int, ramp_steps: int, granularity: int) -> int:
    """Tokens in optimizer step `step`, linear from start_tokens to final_tokens over ramp_steps (as modded-nanogpt's
    records grow their batch), in whole `granularity`s (a micro-batch on every rank): only accumulation changes."""
    tokens = start_tokens + (final_tokens - start_tokens) * min(1.0, step / ramp_steps) if ramp_steps else final_tokens
    return max(granularity, min(final_tokens, int(tokens) // granularity * granularity))


def validation_steps(eval_tokens: int, loader: PretrainLoader, world_size: int) -> int:
    """Validation batches per bits-per-byte measurement: eval_tokens over what all ranks take per batch, but at most
    one pass over the validation split: more would score the same tokens again, and a huge eval_tokens never ends."""
    split_tokens = sum(len(read_shard(path)) for path in loader.paths)
    return max(1, min(eval_tokens, split_tokens) // (loader.tokens * world_size))


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss (or weights): it stops before anything is saved."""


def check_finite_loss(loss: float, step: int, what: str = "training loss") -> None:
    """Stop training on a NaN or infinite loss, before the next checkpoint could save what caused it."""
    if not math.isfinite(loss):
        raise NonFiniteLossError(f"the {what} is {loss} at step {step}: training stopped and nothing was saved (the "
                                 f"newest checkpoint holds the last good weights); lower --lr_scale or check the data")


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    loader: Any, config: Any, dist_info: DistInfo, extra: dict | None = None, keep: int = 0) -> Path:
    """`step_NNNNNN.pt` (model, configs, step and world size; rank 0) and `step_NNNNNN.rankR.pt` (optimizer and
    loader state of each rank: distributed Muon keeps each rank's momentum share apart). Written atomically, of
    tensors, numbers, strings and plain containers only (weights_only=True loads them), never non-finite weights.
    Once every rank has written its part, the run's checkpoints before this one beyond the newest `keep` go (0 keeps
    them all). The notebooks' `extra` holds `total_steps`, the `totals` their summaries add up over sessions, and
    for 05/06 the `origin` they started from: what start_training checks and returns on a resume."""
    broken = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if broken:
        raise NonFiniteLossError(f"step {step}: {len(broken)} weight tensor(s) hold NaN or infinite values "
                                 f"({', '.join(broken[:3])}): not saved; lower --lr_scale or check the data")
    path = Path(directory) / f"step_{step:06d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rank_path = path.with_name(f"{path.stem}.rank{dist_info.rank}.pt")
    atomic_save({"optimizers": [o.state_dict() for o in optimizers], "loader": loader.state_dict()}, rank_path)
    if dist_info.master:
        atomic_save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "config": dataclasses.asdict(config), "step": step, "world_size": dist_info.world_size,
                     **(extra or {})}, path)
    if dist.is_initialized():
        dist.barrier()
    if dist_info.master:
        shutil.rmtree(path.parent / REPLACED, ignore_errors=True)  # a run started over has its own checkpoint now
        if keep:
            prune_checkpoints(path, keep)
    return path


def prune_checkpoints(newest: Path, keep: int) -> None:
    """Remove the run's checkpoints older than `newest` but the `keep` - 1 before it. Only earlier steps go: a later
    one (damaged, so the run resumed before it) is not this run's past, and `newest` itself, just written whole, is
    always kept."""
    earlier = [path for path in checkpoint_paths(newest.parent) if path.name < newest.name]
    for path in earlier[:max(0, len(earlier) - (keep - 1))]:
        delete_checkpoint(path)


def checkpoint_files(path: Path) -> list[Path]:
    """A checkpoint's files: the model's, then each rank's (a model file alone is not taken for a whole one)."""
    return [path, *sorted(path.parent.glob(f"{path.stem}.rank*.pt"))]


def delete_checkpoint(path: Path) -> None:
    for file in checkpoint_files(path):
        file.unlink(missing_ok=True)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _rank_states(path: Path, checkpoint: dict[str, Any], loader: Any, dist_info: DistInfo, made_by: str
                 ) -> dict[str, Any]:
    """This rank's optimizer and loader state. Saved by another number of ranks, it is rebuilt from every rank's
    file when the loader's position is the same on every rank (`position_shared`): per-parameter optimizer state is
    the union of the files (AdamW's is the same on every rank, Muon's momentum sits with the rank that owned the
    matrix; Muon.load_state_dict keeps this rank's share)."""
    saved = checkpoint.get("world_size") or len(list(path.parent.glob(f"{path.stem}.rank*.pt")))
    if saved == dist_info.world_size:
        return load_checkpoint(path.with_name(f"{path.stem}.rank{dist_info.rank}.pt"), dist_info.device,
                               made_by, keys=("optimizers", "loader"))
    if not getattr(loader, "position_shared", False):
        raise CheckpointError(f"{path} was saved by {saved} process(es) and this run has {dist_info.world_size}: "
                              f"{type(loader).__name__} keeps a separate position on each rank, which cannot be "
                              f"split again; resume with {saved} process(es), or start a new run with "
                              f"--run_name=<new name>")
    states = [load_checkpoint(path.with_name(f"{path.stem}.rank{rank}.pt"), dist_info.device, made_by,
                              keys=("optimizers", "loader")) for rank in range(saved)]
    optimizers = [{"param_groups": parts[0]["param_groups"],
                   "state": {key: value for part in parts for key, value in part["state"].items()}}
                  for parts in zip(*(state["optimizers"] for state in states))]
    return {"optimizers": optimizers, "loader": states[0]["loader"]}


def resume_training(directory: Path, model: GPT, optimizers: list[torch.optim.Optimizer], loader: Any,
                    dist_info: DistInfo, made_by: str, log: Callable[[str], None] = print
                    ) -> tuple[int, Path | None, dict[str, Any]]:
    """Continue a run from the newest usable checkpoint in `directory` (model weights, then optimizer and loader or
    sampler state), falling back past damaged ones. Returns (step, checkpoint, what it holds besides the weights),
    or (0, None, {}) when there is none. A checkpoint of another model shape stops with a message instead of a
    confusing state-dict error."""
    paths, damages = checkpoint_paths(directory), []
    seen, ranks = sum_over_ranks([len(paths), 1])
    if not all_ranks_agree(seen == len(paths) * ranks):
        raise CheckpointError(f"the ranks see different checkpoints in {directory}: with several nodes, STACK_HOME "
                              f"must be one shared filesystem (or pass --resume=false)")
    for path in reversed(paths):
        try:
            checkpoint = load_checkpoint(path, dist_info.device, made_by)
            saved = saved_model_config(path, checkpoint["model_config"])
            if saved != model.config:
                raise CheckpointError(f"{path} holds a different model ({model_differences(saved, model.config)}); "
                                      f"keep that run and start a new one with --run_name=<new name>, or replace "
                                      f"it with --resume=false (its checkpoints go at the new run's first save)")
            rank_state, damage = _rank_states(path, checkpoint, loader, dist_info, made_by), None
        except DamagedCheckpointError as error:
            damage = error
        if all_ranks_agree(damage is None):
            model.load_state_dict(checkpoint["model"])
            for optimizer, optimizer_state in zip(optimizers, rank_state["optimizers"]):
                optimizer.load_state_dict(optimizer_state)
            loader.load_state_dict(rank_state["loader"])
            return checkpoint["step"], path, {key: value for key, value in checkpoint.items() if key != "model"}
        damages.append(str(damage or f"another rank could not read its part of {path}"))
        log(f"WARNING: {damages[-1]}; trying the checkpoint before it")
    if paths:
        raise CheckpointError(f"no usable checkpoint in {directory}: all {len(paths)} are damaged (the newest: "
                              f"{damages[0]}); delete them, or start a new run with --run_name=<new name> or "
                              f"--resume=false")
    return 0, None, {}


def model_differences(saved: GPTConfig, current: GPTConfig) -> str:
    """The settings in which a checkpoint's model and this run's differ, each with both values. A vocabulary of
    another size means the tokenizer was trained again since the checkpoint was written."""
    changed = [field.name for field in dataclasses.fields(current)
               if getattr(saved, field.name) != getattr(current, field.name)]
    hint = ": 01_tokenizer ran again since this run began" if "vocab_size" in changed else ""
    values = (f"{name} {getattr(saved, name)!r} there, {getattr(current, name)!r} here" for name in changed)
    return "; ".join(values) + hint


def weights_origin(path: Path | str, checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What a run that starts from checkpoint `path` (05 from 03's, 06 from 05's) records of it: the file, its step,
    and a fingerprint of its weights (a few values of every tensor, hashed), so that a resume can tell whether the
    checkpoint it would start from now is the same model, wherever its file lives."""
    digest = hashlib.sha256()
    for name, tensor in checkpoint["model"].items():
        flat = tensor.detach().flatten()
        digest.update(name.encode() + flat[::max(1, flat.numel() // 64)].double().cpu().numpy().tobytes())
    return {"path": str(path), "step": checkpoint["step"], "weights": digest.hexdigest()[:16]}


def new_run_hint(checkpoint: Path, saved_config: dict[str, Any]) -> str:
    """How to train a run's model for longer: a new run, from `checkpoint`'s weights where the notebook takes a
    starting checkpoint (05_sft and 06_rl: --checkpoint), else from scratch with more steps."""
    if "checkpoint" in saved_config:
        return f"start a new run from its weights: --run_name=<new name> --checkpoint={checkpoint}"
    return "start a new run with more steps: --run_name=<new name> --steps=<more>"


def check_same_origin(saved: dict[str, Any], origin: dict[str, Any] | None, run_name: str) -> None:
    """Refuse to resume (or call complete) a run whose starting checkpoint now holds other weights than the ones it
    was trained from: the run it starts from trained further or started over since."""
    before = saved.get("origin")
    if origin is None or not isinstance(before, dict) or before.get("weights") == origin["weights"]:
        return
    old = before.get("path")
    go_on = (f"the old one is gone: {old} now holds the new one" if old == str(origin["path"]) else
             f"to go on with the old one, pass --checkpoint={old} if that file is still there")
    raise CheckpointError(f"run {run_name!r} was trained from {old} (step {before.get('step')}), but "
                          f"its starting checkpoint is now {origin['path']} (step {origin['step']}), another model: "
                          f"the run it starts from trained further or started over. To train from the new one, "
                          f"start a new run with --run_name=<new name> (or this one over with --resume=false); "
                          f"{go_on}")


def check_same_tokenizer(saved: dict[str, Any], fingerprint: str | None, run_name: str, checkpoint: Path) -> None:
    """Refuse to resume a run trained with another tokenizer than the one there now (01 trained another since): its
    model would go on learning ids that now mean other text, and its next checkpoint would record the new one."""
    before = saved.get("tokenizer_fingerprint")
    if fingerprint is None or before in (None, fingerprint):
        return
    raise CheckpointError(f"run {run_name!r} was trained with another tokenizer ({checkpoint} records fingerprint "
                          f"{before}, the tokenizer now has {fingerprint}): start a new run with --run_name=<new "
                          f"name>, or this one over with --resume=false")


def check_same_length(saved: dict[str, Any], start_step: int, steps: int, run_name: str, checkpoint: Path) -> None:
    """Refuse to resume a run with another --steps than it started with: the learning-rate schedules follow a run's
    length, so a new length would move them mid-run; after the last step, rates cooled to zero would rise again. A
    run past both lengths (finished, given fewer steps) trains nothing: run_is_complete says so."""
    planned = saved.get("total_steps")
    if planned is None or planned == steps or start_step >= max(planned, steps):
        return
    hint = new_run_hint(checkpoint, saved.get("config", {}))
    raise CheckpointError(f"run {run_name!r} was started for {planned} steps ({checkpoint} is at step {start_step}) "
                          f"and --steps={steps} would {'stretch' if steps > planned else 'squeeze'} its "
                          f"learning-rate schedule mid-run (after the last step, rates cooled to zero would rise "
                          f"again): resume it with --steps={planned}, or to train for longer, {hint}")


def run_is_complete(start_step: int, steps: int, run_name: str, checkpoint: Path | None,
                    saved_config: dict[str, Any], log: Callable[[str], None] = print) -> bool:
    """True (and says so) when a resumed run has already reached `steps`: it then trains nothing and leaves its
    summary as it is."""
    if checkpoint is None or start_step < steps:
        return False
    log(f"run {run_name!r} is already complete: {checkpoint} is at step {start_step} and --steps={steps}, so "
        f"nothing is trained and its summary is left as it is (its learning rates have cooled to their end). To "
        f"train it for longer, {new_run_hint(checkpoint, saved_config)}; to start this one over, pass --resume=false")
    return True


def set_aside_earlier_run(checkpoint_dir: Path, run_dir: Path, log: Callable[[str], None] = print) -> None:
    """A run started over (--resume=false) moves the earlier run's checkpoints and metrics.jsonl into
    checkpoint_dir/REPLACED: left beside the new ones, the newest of them, a later step than the new run has
    reached, is what 04-07 and the next resume would load. The new run's first checkpoint deletes them, so a
    mistyped --resume=false or a crash before that loses nothing. Metrics of a run that saved nothing just go."""
    earlier, metrics = checkpoint_paths(checkpoint_dir), Path(run_dir) / "metrics.jsonl"
    if not earlier:
        metrics.unlink(missing_ok=True)
        return
    aside = Path(checkpoint_dir) / REPLACED
    aside.mkdir(exist_ok=True)
    moved = [file for path in earlier for file in checkpoint_files(path)] + ([metrics] if metrics.is_file() else [])
    for file in moved:
        file.replace(aside / file.name)
    log(f"starting over: the earlier run's {len(earlier)} checkpoint(s) wait in {aside} until this run's first "
        f"checkpoint deletes them (move them elsewhere to keep them)")


def start_training(checkpoint_dir: Path, run_dir: Path, model: GPT, optimizers: list[torch.optim.Optimizer],
                   loader: Any, dist_info: DistInfo, made_by: str, run_name: str, steps: int, resume: bool,
                   log: Callable[[str], None] = print, origin: dict[str, Any] | None = None,
                   tokenizer_fingerprint: str | None = None) -> tuple[int, bool, dict[str, float]]:
    """Where a training notebook's loop starts: (first step, whether the run is complete already, the `totals` its
    checkpoint carries from earlier sessions). With `resume` it continues from the newest usable checkpoint and says
    so once, refused when --steps, the starting checkpoint (`origin`, see weights_origin) or the tokenizer changed
    since; a run that starts afresh drops an earlier run's metrics.jsonl and checkpoints, and a resumed one the
    records an interrupted run logged after its checkpoint."""
    prepare_run_folders(Path(checkpoint_dir), Path(run_dir), run_name)
    start_step, latest, saved = (resume_training(checkpoint_dir, model, optimizers, loader, dist_info, made_by, log)
                                 if resume else (0, None, {}))
    if latest is not None:
        check_same_origin(saved, origin, run_name)
        check_same_tokenizer(saved, tokenizer_fingerprint, run_name, latest)
        check_same_length(saved, start_step, steps, run_name, latest)
    complete = run_is_complete(start_step, steps, run_name, latest, saved.get("config", {}), log)
    if latest is None and dist_info.master:
        set_aside_earlier_run(checkpoint_dir, run_dir, log)
    elif latest is not None and not complete:
        if dist_info.master:
            drop_metrics_after(Path(run_dir) / "metrics.jsonl", start_step)
        log(f"resumed from {latest} at step {start_step}")
    return start_step, complete, dict(saved.get("totals", {}))


def prepare_run_folders(checkpoint_dir: Path, run_dir: Path, run_name: str) -> None:
    """Make the run's folders before its first step, so that a path that cannot hold them (a file in the way, no
    write permission, a folder named metrics.jsonl) stops the run at once, not at its first checkpoint, when every
    step trained since would be lost."""
    for folder in (checkpoint_dir, run_dir):
        try:
            make_writable_folder(folder)
        except OSError as error:
            raise ConfigError(f"{folder}: run {run_name!r} cannot keep its files there ({error.strerror}); move what "
                              f"is in the way, or pass --run_name=<new name>") from None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists() and not metrics.is_file():
        raise ConfigError(f"{metrics}: not a file, so run {run_name!r} cannot log to it; move it away, or pass "
                          f"--run_name=<new name>")


def drop_metrics_after(path: Path, step: int) -> None:
    """Keep the records of `path` up to `step`. A run stopped (Ctrl-C, a time limit) after its last checkpoint had
    logged steps that the resumed run trains and logs again; kept, they would appear twice in the curves. A line that
    is not a record (torn as the run was killed, or damaged) goes too; the records around it stay."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(errors="replace").splitlines(keepends=True)
            if (record_step := logged_step(line)) is not None and record_step <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def logged_step(line: str) -> float | None:
    """The step of a metrics.jsonl line (0 for a record without one), None for a line that is not a record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else None


class RunLog:
    """Appends one JSON object per event to `metrics.jsonl` in the run folder (and to wandb when enabled)."""

    def __init__(self, run_dir: Path, enabled: bool = True, wandb_run: Any = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.wandb_run = enabled, wandb_run
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **metrics: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

    def read(self) -> list[dict[str, Any]]:
        """The records logged so far; a line that is not one (torn as a run was killed, or damaged) is left out."""
        lines = self.path.read_text(errors="replace").splitlines() if self.path.exists() else []
        return [json.loads(line) for line in lines if logged_step(line) is not None]
