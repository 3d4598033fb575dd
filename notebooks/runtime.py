"""The first cell of every notebook: get the runtime ready, then say what it has.

The cell finds the project (in a fresh Colab runtime it clones REPO_URL into COLAB_CHECKOUT), puts it on sys.path and
calls setup_runtime(). In Colab alone, that installs what requirements.txt asks for and the runtime lacks and, on
request, keeps STACK_HOME on Google Drive: every Colab notebook runs on its own machine, so Drive is how 02 finds the
tokenizer 01 made. Anywhere, it sets the CPU thread count and prints the GPU, the preset and the dtype.

This module imports only the standard library when it loads, and stackcore (and notebooks/config.py, which imports
it) only after the installs, so that a fresh runtime gets what stackcore needs before stackcore is imported. Tests
play Colab by passing `colab`, `pip` and `mount_drive` and faking the package lists.
"""
from __future__ import annotations

import atexit
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Container, Mapping, Sequence

if TYPE_CHECKING:
    from stackcore import GpuInfo

ROOT = Path(__file__).resolve().parents[1]
REPO_URL = "https://github.com/decoderstack/decoderstack"  # the first cell clones it; the README's badges open it
COLAB_CHECKOUT = Path("/content/decoderstack")
DRIVE_MOUNT = Path("/content/drive")
DRIVE_STACK_HOME = DRIVE_MOUNT / "MyDrive" / "decoderstack"
RUNTIME_OWNED = frozenset({"torch", "triton"})  # never pip-installed: the runtime's builds match its CUDA driver


def in_colab(environ: Mapping[str, str], modules: Container[str] = sys.modules) -> bool:
    """Colab kernels set COLAB_* variables (COLAB_RELEASE_TAG, COLAB_GPU, ...) and have google.colab loaded."""
    return any(name.startswith("COLAB_") for name in environ) or "google.colab" in modules


def colab_drive_hint(environ: Mapping[str, str]) -> str:
    """What a missing artifact means in Colab when STACK_HOME is not on Drive; empty elsewhere."""
    import stackcore as sc

    if not in_colab(environ) or sc.stack_home(environ).is_relative_to(DRIVE_MOUNT):
        return ""
    return ("\nIn Colab every notebook runs on its own machine: tick use_drive in the first cell of each notebook "
            f"so that they share STACK_HOME on Google Drive ({DRIVE_STACK_HOME}), then run the notebook named above.")


def requirement_lines(path: Path) -> list[str]:
    """The requirements of a pip requirements file, without comments, blank lines and options such as -r."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def installed_distributions() -> dict[str, str]:
    """{normalised distribution name: version} of what this Python has installed."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    return {canonicalize_name(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"]}


def imported_distributions() -> set[str]:
    """Normalised names of the distributions whose modules this process has imported already."""
    import importlib.metadata

    from packaging.utils import canonicalize_name

    owners = importlib.metadata.packages_distributions()
    loaded = {name.partition(".")[0] for name in list(sys.modules)}
    return {canonicalize_name(dist) for module in loaded for dist in owners.get(module, ())}


def missing_requirements(lines: Sequence[str], installed: Mapping[str, str]) -> list[str]:
    """The requirement lines that `installed` ({normalised name: version}) does not satisfy. A line whose
    environment marker is false here (triton off Linux) is not needed."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    missing = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installed.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(line)
    return missing


def colab_installs(missing: Sequence[str], imported: Container[str]) -> tuple[list[str], list[str]]:
    """(what pip installs, notes) for Colab. Never torch or triton; never a package the kernel has imported: pip
    would replace its files under the live modules (Colab's widget manager broke that way with ipywidgets)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    owned = [line for line in missing if Requirement(line).name in RUNTIME_OWNED]
    loaded = [line for line in missing if line not in owned and canonicalize_name(Requirement(line).name) in imported]
    notes = [f"{', '.join(owned)} not satisfied: torch and triton stay as this runtime has them"] if owned else []
    if loaded:
        notes.append(f"{', '.join(loaded)} not satisfied but already imported: run python3 -m pip install "
                     f"{' '.join(repr(line) for line in loaded)}, then Runtime > Restart session")
    return [line for line in missing if line not in owned + loaded], notes


def pip_install(lines: Sequence[str]) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *lines], check=True)


def mount_google_drive(mount_point: str) -> None:
    """Colab asks the user for access to their Drive, then mounts it."""
    from google.colab import drive

    drive.mount(mount_point)


def setup_runtime(use_drive: bool = False, colab: bool | None = None,
                  pip: Callable[[Sequence[str]], None] = pip_install,
                  mount_drive: Callable[[str], None] = mount_google_drive) -> None:
    """The first cell's call: make this runtime ready and print what it has. `use_drive` (or STACK_DRIVE=1) keeps
    STACK_HOME on Google Drive in Colab. `colab` (default: detected), `pip` and `mount_drive` are for tests."""
    colab = in_colab(os.environ) if colab is None else colab
    missing = missing_requirements(requirement_lines(ROOT / "requirements.txt"), installed_distributions())
    notes, install = [], []
    if colab:
        install, notes = colab_installs(missing, imported_distributions())
        if install:
            pip(install)
    elif missing:
        notes.append(f"missing {', '.join(missing)}: run python3 -m pip install -r requirements.txt")

    import stackcore as sc  # after the installs
    from notebooks.config import parse_value

    end_scripts_on_user_errors()
    use_drive = use_drive or parse_value("STACK_DRIVE", os.environ.get("STACK_DRIVE", "false"), bool)
    if colab and use_drive:
        if not (DRIVE_MOUNT / "MyDrive").is_dir():
            mount_drive(str(DRIVE_MOUNT))
        os.environ["STACK_HOME"] = str(DRIVE_STACK_HOME)
    elif colab:
        notes.append("STACK_HOME is on this runtime's disk: the next notebook (its own machine) will not see it; "
                     "tick use_drive to keep artifacts on Google Drive")
    elif use_drive:
        notes.append(f"use_drive applies in Colab only; STACK_HOME stays {sc.stack_home()}")
    gpu = sc.current_gpu()
    if colab and gpu is None:
        notes.append("no GPU: choose Runtime > Change runtime type > GPU (T4 is free) for the colab preset")
    threads = set_cpu_threads()
    silence_triton_teardown()
    print_whole_lines()
    if os.environ.get("RANK", "0") == "0":
        print(describe_runtime(gpu, threads, install, notes))


def end_scripts_on_user_errors() -> None:
    """In a twin run as a script, an error the user fixes by changing a setting or running an earlier notebook
    (stackcore's ConfigError, MissingArtifactError, and CheckpointError and ShardError, whose messages name the file
    and what to do; training's NonFiniteLossError, which names the step and the setting to lower) ends the run with
    its one-line message instead of a traceback: exit status 2 for a bad option or setting (notebooks/config.py's
    reading_settings), 1 for one found later. Other errors keep their traceback, and in a notebook kernel every
    exception shows as usual. Ctrl-C ends it with one line saying where it stopped and how to resume, and exit
    status 130. Installed once, however often it is called."""
    import stackcore as sc
    from notebooks.config import in_notebook_kernel
    from notebooks.training import NonFiniteLossError

    if in_notebook_kernel() or getattr(sys.excepthook, "ends_on_user_errors", False):
        return
    default_hook = sys.excepthook

    def hook(kind: type[BaseException], error: BaseException, trace: object) -> None:
        if isinstance(error, KeyboardInterrupt):
            if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets Ctrl-C: one says so
                # to sys.__stderr__: torch's excepthook (init_process_group) captures sys.stderr around this hook
                # and drops the capture when the SystemExit below passes through it
                print(interrupted_message(trace), file=sys.__stderr__, flush=True)
            raise SystemExit(130)  # the shell's status for a command ended by SIGINT
        user_errors = (sc.ConfigError, sc.MissingArtifactError, sc.CheckpointError, sc.ShardError, NonFiniteLossError)
        if not isinstance(error, user_errors):
            return default_hook(kind, error, trace)
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr, flush=True)
        # Python exits with 1 after a hook returns, or with the status of a SystemExit the hook raises. Returning
        # also lets torch's excepthook (installed over this one by init_process_group) print what we printed.
        if getattr(error, "exit_status", 1) != 1:
            raise SystemExit(error.exit_status)

    hook.ends_on_user_errors = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def interrupted_message(trace: Any) -> str:
    """Ctrl-C in a twin: where it stopped (one line, not a traceback through torch) and how to go on."""
    import traceback

    frames = traceback.extract_tb(trace) if trace is not None else []
    script = [frame for frame in frames if Path(frame.filename).resolve() == Path(sys.argv[0]).resolve()]
    frame = (script or frames or [None])[-1]  # the twin's line, not the innermost frame deep in torch
    where = f" in {Path(frame.filename).name} line {frame.lineno}" if frame else ""
    return (f"{Path(sys.argv[0]).name}: interrupted{where}. Run the same command again: 03_pretrain, 05_sft and "
            f"06_rl continue from their newest checkpoint (resume=True), the steps after it are trained again")


def print_whole_lines() -> None:
    """Send each line a script prints on at once, also into a file or a pipe (`03_pretrain.py > run.log`, nohup,
    the pipeline): Python writes such a stdout in blocks of several KB, so `tail -f` showed no step for minutes
    and a run killed by a time limit lost its last lines. A notebook kernel's stream is left as it is."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def set_cpu_threads(environ: Mapping[str, str] = os.environ) -> int:
    """On a machine without a GPU, give torch half the cores this process may use, at most 4 (1 per process under
    torchrun), unless OMP_NUM_THREADS says otherwise: OpenMP threads that spin while another process holds their
    cores slow every matmul down. Returns the count torch uses."""
    import torch

    if "OMP_NUM_THREADS" not in environ and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        processes = int(environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(1 if processes > 1 else max(1, min(4, cores // 2)))
    return torch.get_num_threads()


def silence_triton_teardown() -> None:
    """On a machine without a GPU, triton (which torch imports too) prints nanobind's leak report of its bindings
    to stderr while the interpreter shuts down, after the run's own output. From the exit handlers on, stderr goes
    to /dev/null when triton is loaded, as triton does in its own compile workers (_compile_warmup_pool.py).
    Exit handlers run last-registered first: what registers after this call still writes to stderr."""
    import torch

    def drop_stderr() -> None:
        if "triton" in sys.modules:
            sys.stderr.flush()
            os.dup2(os.open(os.devnull, os.O_WRONLY), 2)

    if not torch.cuda.is_available():
        atexit.register(drop_stderr)


def project_commit() -> str:
    """The checkout's short commit hash (the set-up cell and the report card name it)."""
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return git.stdout.strip() if git.returncode == 0 else "unknown (not a git checkout)"


def describe_runtime(gpu: GpuInfo | None, threads: int, installed: Sequence[str], notes: Sequence[str]) -> str:
    """The lines the first cell prints."""
    import torch

    import stackcore as sc
    from notebooks.config import choose_preset, colab_gpu_tier, parse_cli_overrides, reading_settings, script_argv

    with reading_settings():
        preset = choose_preset(parse_cli_overrides(script_argv()), os.environ, gpu)
        tier = colab_gpu_tier(gpu, os.environ.get("STACK_COLAB_GPU", "")) if preset == "colab" else None
        dtype = sc.compute_dtype_for(gpu, os.environ.get("STACK_DTYPE", "auto"))
    hardware = (f"{gpu.name}, {gpu.memory_gb:.1f} GB, compute capability {gpu.capability[0]}.{gpu.capability[1]}"
                if gpu else f"none (CPU, {threads} torch thread{'s' * (threads > 1)})")
    sizes = f" ({tier} sizes)" if tier else ""
    scaling = " with loss scaling" if dtype == torch.float16 else ""
    lines = [f"DecoderStack {ROOT} at commit {project_commit()}; torch {torch.__version__}",
             f"GPU: {hardware}", f"preset: {preset}{sizes}; compute dtype: {str(dtype)[6:]}{scaling}",
             f"STACK_HOME: {sc.stack_home()}"]
    lines += [f"installed: {', '.join(installed)}"] if installed else []
    return "\n".join(lines + [f"note: {note}" for note in notes])
