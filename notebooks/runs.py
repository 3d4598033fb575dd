"""A run's checkpoint by the run's name, as 04_core_eval, 05_sft and 07_chat take it (`run_name`, `base_run`): a name
without checkpoints (misspelt, or not trained yet) is answered with the runs that have some and the notebook that
trained each, rather than only with the notebook that trains the default run."""
from __future__ import annotations

from pathlib import Path

from stackcore import (CHECKPOINT_MAKERS, CheckpointError, MissingArtifactError, artifact_dir, latest_checkpoint,
                       load_checkpoint, stack_home)


def notebook_that_saved(checkpoint: Path) -> str:
    """The notebook that saved `checkpoint`, as it records (`made_by`); for a checkpoint saved before that was
    recorded, the notebook whose default run name its folder has."""
    try:
        state = load_checkpoint(checkpoint, keys=("model",))
    except CheckpointError:
        return "damaged"
    return str(state.get("made_by") or CHECKPOINT_MAKERS.get(checkpoint.parent.name, "unknown notebook"))


def runs_with_checkpoints() -> dict[str, str]:
    """Each run under STACK_HOME/checkpoints that holds a checkpoint, and the notebook that saved its newest one."""
    root = artifact_dir("checkpoints", create=False)
    newest = {folder.name: latest_checkpoint(folder) for folder in sorted(root.glob("*")) if folder.is_dir()}
    return {run: notebook_that_saved(path) for run, path in newest.items() if path is not None}


def run_checkpoint(run_name: str, setting: str, made_by: str) -> Path:
    """The newest checkpoint of run `run_name`, which the `setting` (run_name, base_run) named. Without one, the error
    lists the runs that have one; where there is none at all, it names `made_by`, the notebook to run first."""
    directory = artifact_dir("checkpoints", create=False) / run_name
    path = latest_checkpoint(directory)
    if path is not None:
        return path
    runs = runs_with_checkpoints()
    if not runs:
        raise MissingArtifactError(f"no checkpoint in {directory}: run notebooks/{made_by} first (STACK_HOME is "
                                   f"{stack_home()})")
    listed = ", ".join(f"{run} ({maker})" for run, maker in runs.items())
    raise MissingArtifactError(f"no checkpoint in {directory}; the runs with checkpoints are {listed}: pass "
                               f"--{setting}=<one of them>, or run notebooks/{made_by} to make {run_name!r} "
                               f"(STACK_HOME is {stack_home()})")
