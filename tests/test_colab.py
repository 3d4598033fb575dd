"""The Colab path: the first cell of every notebook, setup_runtime in a simulated Colab (fake installs, fake pip, git
and Drive; nothing downloaded), the GPU -> preset mapping, fp16 loss scaling, and the messages a notebook stops with
when an earlier notebook's artifact is missing."""
import os
import re
import select
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import jupytext
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import stackcore as sc
from conftest import ROOT
from notebooks import runtime as rt
from notebooks.config import StackConfig, auto_preset, colab_gpu_tier, configure

T4 = sc.GpuInfo("Tesla T4", (7, 5), 15.8)
V100 = sc.GpuInfo("Tesla V100-SXM2-16GB", (7, 0), 17.2)
L4 = sc.GpuInfo("NVIDIA L4", (8, 9), 23.7)
A10G = sc.GpuInfo("NVIDIA A10G", (8, 6), 23.9)
RTX5090 = sc.GpuInfo("NVIDIA GeForce RTX 5090", (12, 0), 34.2)
A100_40 = sc.GpuInfo("NVIDIA A100-SXM4-40GB", (8, 0), 42.5)
A100_80 = sc.GpuInfo("NVIDIA A100-SXM4-80GB", (8, 0), 85.1)
H100 = sc.GpuInfo("NVIDIA H100 80GB HBM3", (9, 0), 85.0)
H200 = sc.GpuInfo("NVIDIA H200", (9, 0), 150.0)
COLAB_ENV = {"COLAB_RELEASE_TAG": "release-colab-20261120-060000", "COLAB_GPU": "1"}
REQUIREMENTS = {canonicalize_name(Requirement(line).name): line
                for line in rt.requirement_lines(ROOT / "requirements.txt")}
# a runtime that has every requirement at the lowest version it allows (each line is name>=version)
SATISFIED = {name: next(iter(Requirement(line).specifier)).version for name, line in REQUIREMENTS.items()}


# ----- the GPU decides the preset's sizes and the dtype


@pytest.mark.parametrize("gpu, tier, preset, dtype", [
    (T4, "t4", "colab", torch.float16), (V100, "t4", "colab", torch.float16),
    (L4, "l4", "colab", torch.bfloat16), (A10G, "l4", "colab", torch.bfloat16),
    (RTX5090, "l4", "colab", torch.bfloat16), (A100_40, "a100", "colab", torch.bfloat16),
    (A100_80, "a100", "colab", torch.bfloat16), (H100, "h100", "speedrun", torch.bfloat16),
    (H200, "h100", "speedrun", torch.bfloat16), (None, None, "tiny", torch.float32),
], ids=lambda v: v.name if isinstance(v, sc.GpuInfo) else None)
def test_gpu_decides_tier_preset_and_dtype(gpu, tier, preset, dtype):
    assert colab_gpu_tier(gpu) == tier
    assert auto_preset(gpu) == preset
    assert sc.compute_dtype_for(gpu) == dtype


def test_several_gpus_mean_node_and_overrides_win():
    assert auto_preset(H100, world_size=8) == "node"
    assert colab_gpu_tier(H100, override="t4") == "t4"
    assert sc.compute_dtype_for(T4, "float32") == torch.float32
    with pytest.raises(sc.ConfigError, match="valid: t4, l4, a100, h100"):
        colab_gpu_tier(T4, override="p100")
    with pytest.raises(sc.ConfigError, match="valid: auto, bfloat16, float16, float32"):
        sc.compute_dtype_for(T4, "fp8")


@dataclass
class TrainConfig(StackConfig):
    depth: int = 12
    steps: int = 2000
    attention: str = "auto"
    PRESETS = {"colab": dict(depth=8, steps=1000), "colab_t4": dict(depth=6, attention="sdpa"),
               "speedrun": dict(steps=3000)}


@pytest.mark.parametrize("gpu, environ, expected", [
    (T4, {}, (6, 1000, "sdpa")),  # the colab table, then colab_t4
    (L4, {}, (8, 1000, "auto")),  # no colab_l4 table: the colab sizes
    (H100, {}, (12, 3000, "auto")),  # colab on an H100 is the speedrun
    (H100, {"STACK_COLAB_GPU": "t4"}, (6, 1000, "sdpa")),  # preview the T4 sizes on a bigger GPU
    (None, {}, (8, 1000, "auto")),  # colab asked for without a GPU: its own table
])
def test_colab_preset_fits_the_gpu(monkeypatch, gpu, environ, expected):
    monkeypatch.setattr("notebooks.config.current_gpu", lambda device="cuda": gpu)
    cfg = configure(TrainConfig, ["--preset=colab"], environ)
    assert (cfg.depth, cfg.steps, cfg.attention) == expected
    assert configure(TrainConfig, ["--preset=colab", "--depth=4"], environ).depth == 4


def test_auto_preset_follows_the_gpu(monkeypatch):
    monkeypatch.setattr("notebooks.config.current_gpu", lambda device="cuda": T4)
    assert configure(TrainConfig, [], {}).preset == "colab"
    monkeypatch.setattr("notebooks.config.current_gpu", lambda device="cuda": H100)
    assert configure(TrainConfig, [], {}).preset == "speedrun"


# ----- fp16 loss scaling


def tiny_model_and_batch():
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(vocab_size=64, depth=2, model_dim=32, head_dim=16, max_seq_len=32))
    ids = torch.randint(0, 64, (65,))
    return model, (ids[:-1], torch.tensor([0, 32, 64], dtype=torch.int32), 32, ids[1:])


def test_loss_scaler_trains_in_fp16_mode_and_skips_overflowing_steps():
    model, batch = tiny_model_and_batch()
    optimizers, scaler = sc.build_optimizers(model), sc.LossScaler(torch.float16, "cpu")
    losses = []
    for _ in range(3):
        loss = model(*batch)
        scaler.scale(loss).backward()
        scaler.step(optimizers)
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(p.grad is None for p in model.parameters())
    scale, head = scaler.scaler.get_scale(), model.lm_head.weight.detach().clone()
    scaler.scale(model(*batch)).backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    scaler.step(optimizers)
    assert torch.equal(head, model.lm_head.weight)  # Adam, whose gradients overflowed, skipped its step
    assert scaler.scaler.get_scale() == scale / 2


def test_loss_scaler_is_a_plain_step_without_fp16(monkeypatch):
    model, batch = tiny_model_and_batch()
    optimizers, scaler = sc.build_optimizers(model), sc.LossScaler(torch.bfloat16, "cpu")
    loss = model(*batch)
    assert scaler.scale(loss) is loss
    loss.backward()
    scaler.step(optimizers)
    assert all(p.grad is None for p in model.parameters())
    monkeypatch.setattr(sc, "world_size_and_rank", lambda: (2, 0))
    with pytest.raises(sc.ConfigError, match="STACK_DTYPE=float32"):
        sc.LossScaler(torch.float16, "cpu")


# ----- setup_runtime in a simulated Colab


@dataclass
class Recorder:
    """Fake pip and Drive mount: records every call, downloads nothing."""
    installs: list
    mounts: list

    def pip(self, lines):
        self.installs.append(list(lines))

    def mount(self, mount_point):
        self.mounts.append(mount_point)


@pytest.fixture
def runtime(monkeypatch, stack_home):
    """Play a runtime: set_up(...) runs setup_runtime with fake package lists, GPU and environment."""
    def set_up(use_drive=False, installed=None, imported=(), gpu=T4, colab=True, drive_mounted=False, environ=None):
        for name in [*COLAB_ENV, "STACK_DRIVE", "STACK_PRESET", "STACK_COLAB_GPU", "STACK_DTYPE"]:
            monkeypatch.delenv(name, raising=False)
        for name, value in {"STACK_HOME": str(stack_home), **(COLAB_ENV if colab else {}), **(environ or {})}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(rt, "installed_distributions", lambda: SATISFIED if installed is None else installed)
        monkeypatch.setattr(rt, "imported_distributions", lambda: set(imported))
        monkeypatch.setattr(sc, "current_gpu", lambda device="cuda": gpu)
        monkeypatch.setattr("notebooks.config.script_argv", lambda: [])
        monkeypatch.setattr(rt, "DRIVE_MOUNT", stack_home / ("mounted" if drive_mounted else "drive"))
        (stack_home / "mounted" / "MyDrive").mkdir(parents=True, exist_ok=True)
        recorder = Recorder([], [])
        assert rt.setup_runtime(use_drive, colab=colab, pip=recorder.pip, mount_drive=recorder.mount) is None
        return recorder
    return set_up


def test_colab_is_detected_by_its_variables_or_module():
    assert rt.in_colab(COLAB_ENV, modules={})
    assert rt.in_colab({}, modules={"google.colab": object()})
    assert not rt.in_colab({"HOME": "/root"}, modules={})


def test_colab_installs_only_what_it_lacks_and_never_torch(runtime, capsys):
    installed = {name: version for name, version in SATISFIED.items() if name not in ("rustbpe", "jupytext")}
    installed.update(torch="2.0.0+cu118", tiktoken="0.0.1")  # torch too old, tiktoken too old
    recorder = runtime(installed=installed)
    wanted = [REQUIREMENTS[name] for name in ("tiktoken", "rustbpe", "jupytext")]
    assert recorder.installs == [sorted(wanted, key=list(REQUIREMENTS.values()).index)]
    out = capsys.readouterr().out
    assert f"{REQUIREMENTS['torch']} not satisfied: torch and triton stay as this runtime has them" in out
    assert "GPU: Tesla T4, 15.8 GB, compute capability 7.5" in out
    assert "preset: colab (t4 sizes); compute dtype: float16 with loss scaling" in out
    assert re.search(r"at commit \w+", out)


def test_colab_never_upgrades_a_package_the_kernel_has_imported(runtime, capsys):
    installed = dict(SATISFIED, ipywidgets="7.6.0", tqdm="4.0.0")
    recorder = runtime(installed=installed, imported={"ipywidgets"})
    assert recorder.installs == [[REQUIREMENTS["tqdm"]]]
    out = capsys.readouterr().out
    assert f"{REQUIREMENTS['ipywidgets']} not satisfied but already imported" in out and "Restart session" in out


def test_colabs_own_ipywidgets_satisfies_the_requirements():
    """Colab has shipped ipywidgets 7.7.1; the chat panel works with 7.x and 8.x, so neither is upgraded."""
    for version in ("7.7.1", "8.1.5"):
        assert rt.missing_requirements([REQUIREMENTS["ipywidgets"]], {"ipywidgets": version}) == []


def test_imported_distributions_names_what_this_process_loaded():
    assert {"numpy", "torch"} <= rt.imported_distributions()


def test_a_ready_runtime_installs_nothing(runtime, capsys):
    assert runtime(gpu=A100_40).installs == []
    assert "preset: colab (a100 sizes); compute dtype: bfloat16" in capsys.readouterr().out


def test_outside_colab_nothing_is_installed_or_mounted(runtime, capsys, stack_home):
    recorder = runtime(use_drive=True, installed={"torch": "9.9"}, gpu=None, colab=False)
    assert recorder.installs == [] and recorder.mounts == []
    assert os.environ["STACK_HOME"] == str(stack_home)
    out = capsys.readouterr().out
    assert "preset: tiny" in out and "use_drive applies in Colab only" in out
    assert "python3 -m pip install -r requirements.txt" in out


def test_drive_is_mounted_only_when_asked(runtime, capsys):
    recorder = runtime()
    assert recorder.mounts == [] and "tick use_drive" in capsys.readouterr().out
    recorder = runtime(use_drive=True)
    assert recorder.mounts == [str(rt.DRIVE_MOUNT)]
    assert os.environ["STACK_HOME"] == str(rt.DRIVE_STACK_HOME)


def test_drive_by_variable_and_no_second_mount(runtime):
    recorder = runtime(environ={"STACK_DRIVE": "1"}, drive_mounted=True)
    assert recorder.mounts == [] and os.environ["STACK_HOME"] == str(rt.DRIVE_STACK_HOME)


def test_colab_without_a_gpu_says_how_to_get_one(runtime, capsys):
    runtime(gpu=None)
    out = capsys.readouterr().out
    assert "preset: tiny" in out and "Change runtime type" in out


@pytest.mark.parametrize("environ, cores, local_world, threads", [
    ({}, 2, 1, 1), ({}, 6, 1, 3), ({}, 64, 1, 4), ({}, 64, 8, 1), ({"OMP_NUM_THREADS": "3"}, 64, 1, None)])
def test_cpu_runs_pick_their_thread_count(monkeypatch, environ, cores, local_world, threads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    before = torch.get_num_threads()
    try:
        got = rt.set_cpu_threads({**environ, "LOCAL_WORLD_SIZE": str(local_world)})
        assert got == (before if threads is None else threads) == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_requirement_check_reads_versions_names_and_markers():
    lines = ["numpy>=1.26", "huggingface_hub>=0.30", "triton>=3.3; sys_platform == 'nowhere'", "tqdm>=4.66"]
    installed = {"numpy": "1.24.0", "huggingface-hub": "0.36.0"}
    assert rt.missing_requirements(lines, installed) == ["numpy>=1.26", "tqdm>=4.66"]
    assert rt.missing_requirements(rt.requirement_lines(ROOT / "requirements.txt"), SATISFIED) == []


# ----- the first cell: find or clone the project, then setup_runtime


def first_code_cell(twin):
    return next(cell.source for cell in jupytext.read(twin).cells if cell.cell_type == "code")


TWINS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_every_notebook_opens_with_the_same_set_up_cell():
    cells = {twin.name: first_code_cell(twin) for twin in TWINS}
    assert len(set(cells.values())) == 1, f"first code cells differ: {sorted(cells)}"
    cell = cells[TWINS[0].name]
    assert f'"{rt.REPO_URL}"' in cell and f'"{rt.COLAB_CHECKOUT}"' in cell
    assert cell.index("setup_runtime(use_drive)") < cell.index("import stackcore as sc")  # installs come first


def test_the_runtime_module_loads_with_the_standard_library_alone():
    """A fresh Colab runtime imports notebooks/runtime.py before it has what requirements.txt lists (-S: without
    the start-up hooks that site-packages install)."""
    probe = "import sys, notebooks.runtime; print(' '.join(sorted({m.partition('.')[0] for m in sys.modules})))"
    loaded = subprocess.run([sys.executable, "-S", "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert set(loaded.stdout.split()) - set(sys.stdlib_module_names) == {"__main__", "notebooks"}


def test_readme_badges_open_the_repository_the_first_cell_clones():
    badges = re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/blob/main/(notebooks/\S+?\.ipynb)",
                        (ROOT / "README.md").read_text())
    assert badges and {repo for repo, _ in badges} == {rt.REPO_URL.removeprefix("https://github.com/")}
    assert all((ROOT / path).is_file() for _, path in badges)


@pytest.mark.parametrize("where, clones", [("elsewhere", True), ("root", False), ("notebooks", False)])
def test_first_cell_clones_only_outside_a_checkout(monkeypatch, tmp_path, where, clones):
    calls = []
    monkeypatch.chdir({"elsewhere": tmp_path, "root": ROOT, "notebooks": ROOT / "notebooks"}[where])
    monkeypatch.setattr(subprocess, "run", lambda command, check: calls.append(command))
    monkeypatch.setattr(rt, "setup_runtime", lambda use_drive: calls.append(("setup_runtime", use_drive)))
    monkeypatch.setattr(sys, "path", list(sys.path))
    namespace = {}
    exec(first_code_cell(TWINS[0]), namespace)
    expected_root = str(rt.COLAB_CHECKOUT) if clones else str(ROOT)
    assert namespace["ROOT"] == expected_root and sys.path[0] == expected_root
    clone = [["git", "clone", "--depth=1", rt.REPO_URL, str(rt.COLAB_CHECKOUT)]] if clones else []
    assert calls == [*clone, ("setup_runtime", False)]


# ----- a notebook whose input is missing names the notebook to run first and where it looked


def run_twin(name, stack_home, *args):
    env = {**os.environ, "STACK_HOME": str(stack_home), "STACK_PRESET": "tiny"}
    env.pop("COLAB_RELEASE_TAG", None)
    return subprocess.run([sys.executable, f"notebooks/{name}.py", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("twin, made_by, looked_in", [
    ("02_sharding", "01_tokenizer", "tokenizer/tokenizer.tiktoken"),
    ("03_pretrain", "01_tokenizer", "tokenizer/tokenizer.tiktoken"),
    ("04_core_eval", "03_pretrain", "checkpoints/pretrain"),
])
def test_twin_against_an_empty_stack_home(stack_home, twin, made_by, looked_in):
    result = run_twin(twin, stack_home)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-2000:]  # the message alone (end_scripts_on_user_errors)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"{twin}.py: error: ") and f"run notebooks/{made_by} first" in error
    assert str(stack_home / looked_in) in error


def run_script_raising(tmp_path, raised: str) -> subprocess.CompletedProcess:
    """A twin's shape: install end_scripts_on_user_errors, then `raise <raised>` on line 3."""
    script = tmp_path / "twin.py"
    script.write_text(f"from notebooks.runtime import end_scripts_on_user_errors\n"
                      f"end_scripts_on_user_errors()\nraise {raised}\n")
    return subprocess.run([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)


def test_other_errors_in_a_twin_keep_their_traceback(tmp_path):
    result = run_script_raising(tmp_path, "KeyError('kept')")
    assert result.returncode == 1 and "Traceback" in result.stderr and "KeyError: 'kept'" in result.stderr


def test_a_checkpoint_of_another_run_ends_a_twin_in_one_line(tmp_path):
    """Resuming a checkpoint of another model says what to do (a new run_name); a traceback through torch would
    bury that line."""
    result = run_script_raising(tmp_path, "__import__('stackcore').CheckpointError('x.pt holds a different model')")
    assert result.returncode == 1 and result.stderr.strip() == "twin.py: error: x.pt holds a different model"


def test_a_loss_that_went_non_finite_ends_a_twin_in_one_line(tmp_path):
    """check_finite_loss's message names the step and what to lower: the user's next move, not a bug to trace."""
    raised = "__import__('notebooks.training').training.NonFiniteLossError('nan at step 7')"
    result = run_script_raising(tmp_path, raised)
    assert result.returncode == 1 and result.stderr.strip() == "twin.py: error: nan at step 7"


def test_ctrl_c_in_a_twin_says_where_and_how_to_resume(tmp_path):
    result = run_script_raising(tmp_path, "KeyboardInterrupt")
    assert result.returncode == 130 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("twin.py: interrupted in twin.py line 3. Run the same command again: 03_pretrain, "
                                     "05_sft and 06_rl continue from their newest checkpoint (resume=True), the steps "
                                     "after it are trained again")


def test_ctrl_c_under_torchrun_is_said_once_at_the_twins_line(tmp_path):
    """After init_process_group (whose excepthook captures stderr around ours), Ctrl-C deep in a library call: rank 0
    names the twin's line that called it, another rank says nothing; both exit 130."""
    (tmp_path / "library.py").write_text("def work():\n    raise KeyboardInterrupt\n")
    script = tmp_path / "twin.py"
    script.write_text("from notebooks.runtime import end_scripts_on_user_errors\n"
                      "end_scripts_on_user_errors()\n"
                      "import torch.distributed as dist\n"
                      "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:0', rank=0, world_size=1)\n"
                      "import library\n"
                      "library.work()\n")
    for rank, said in (("0", "twin.py: interrupted in twin.py line 6. Run the same command again"), ("1", "")):
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": f"{ROOT}:{tmp_path}", "RANK": rank})
        assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().startswith(said) and (said or not result.stderr.strip())


def test_a_twin_writing_into_a_pipe_sends_each_line_as_it_is_printed(tmp_path):
    """`03_pretrain.py > run.log` or a pipe: the set-up cell's lines arrive while the script still runs (here it
    waits on stdin), not in one block when it ends."""
    script = tmp_path / "twin.py"
    script.write_text("import sys\nfrom notebooks.runtime import setup_runtime\n"
                      "setup_runtime()\nprint('set up')\nsys.stdin.read()\n")
    environ = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={**environ, "PYTHONPATH": str(ROOT), "STACK_PRESET": "tiny"})
    try:
        lines, chunk, deadline = b"", b"start", time.monotonic() + 60
        while b"set up\n" not in lines and chunk and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 1)[0]:
                chunk = os.read(process.stdout.fileno(), 4096)  # b"" once the script has ended
                lines += chunk
        assert b"set up\n" in lines and process.poll() is None, lines.decode()
    finally:
        process.kill()
        process.wait()


def test_sharding_into_a_log_file_writes_no_progress_bars(stack_home, tiny_tokenizer):
    """A bar redrawn into a file (stderr is no terminal here) is a run of carriage returns and half-lines."""
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    result = run_twin("02_sharding", stack_home)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr and "doc/s" not in result.stderr and "conv/s" not in result.stderr
    assert "tokenized" in result.stdout  # what the bars showed, said once when the split is written


def test_core_eval_refuses_a_checkpoint_of_another_vocabulary(stack_home, tiny_tokenizer):
    """01 run again with another vocab_size after 03: scoring the old model on task shards of the new tokenizer
    would feed it ids that mean other text."""
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    config = sc.GPTConfig(vocab_size=400, depth=1, model_dim=64, head_dim=32, max_seq_len=64)
    (stack_home / "checkpoints" / "pretrain").mkdir(parents=True)
    torch.save({"model": sc.GPT(config).state_dict(), "model_config": asdict(config), "step": 1},
               stack_home / "checkpoints" / "pretrain" / "step_000001.pt")
    result = run_twin("04_core_eval", stack_home)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "holds a model with a vocabulary of 400 tokens, but the tokenizer" in result.stderr
    assert f"{stack_home / 'tokenizer'} has 512" in result.stderr


def save_tiny_checkpoint(path, **entries):
    config = sc.GPTConfig(vocab_size=512, depth=1, model_dim=64, head_dim=32, max_seq_len=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": sc.GPT(config).state_dict(), "model_config": asdict(config), "step": 1, **entries}, path)


def test_a_tokenizer_retrained_at_the_same_size_is_refused_by_the_next_notebooks(stack_home, tiny_tokenizer):
    """01 run again on other text with the same vocab_size after 02 and 03: the old shards and model would read the
    new ids as other text. 03 refuses the shards by their stamp, 04 and 07 the model by its recorded fingerprint."""
    from data.synthetic import synthetic_documents

    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    assert run_twin("02_sharding", stack_home).returncode == 0
    old = sc.Tokenizer.load(tiny_tokenizer).fingerprint
    save_tiny_checkpoint(stack_home / "checkpoints" / "pretrain" / "step_000001.pt", tokenizer_fingerprint=old)
    new = sc.Tokenizer.train(synthetic_documents(800, seed=11), 512)
    new.save(stack_home / "tokenizer")
    result = run_twin("03_pretrain", stack_home)
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and error.startswith(f"03_pretrain.py: error: {stack_home / 'shards' / 'pretrain'}")
    assert f"'{old}', but the tokenizer in {stack_home / 'tokenizer'} is '{new.fingerprint}'" in error
    assert error.endswith("run notebooks/02_sharding again")
    for twin in ("04_core_eval", "07_chat"):
        result = run_twin(twin, stack_home)
        error = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert error.startswith(f"{twin}.py: error: {stack_home / 'checkpoints' / 'pretrain' / 'step_000001.pt'}")
        assert f"(fingerprint {new.fingerprint}; the model's: {old})" in error


@pytest.mark.parametrize("twin, setting", [("04_core_eval", "run_name"), ("05_sft", "base_run"),
                                           ("07_chat", "run_name")])
def test_a_misspelt_run_name_lists_the_runs_there_are(stack_home, tiny_tokenizer, twin, setting):
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    save_tiny_checkpoint(stack_home / "checkpoints" / "pretrain" / "step_000001.pt", made_by="03_pretrain")
    save_tiny_checkpoint(stack_home / "checkpoints" / "sft" / "step_000001.pt", made_by="05_sft")
    result = run_twin(twin, stack_home, f"--{setting}=pretrian")
    error = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert error.startswith(f"{twin}.py: error: no checkpoint in {stack_home / 'checkpoints' / 'pretrian'}; ")
    assert f"are pretrain (03_pretrain), sft (05_sft): pass --{setting}=<one of them>" in error


def test_pretrain_with_a_tokenizer_but_no_shards(stack_home, tiny_tokenizer):
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    result = run_twin("03_pretrain", stack_home)
    error = result.stderr.strip().splitlines()[-1]
    assert "run notebooks/02_sharding first" in error and str(stack_home / "shards" / "pretrain") in error


def test_in_colab_a_missing_artifact_says_to_share_stack_home_on_drive(monkeypatch, stack_home):
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    with pytest.raises(sc.MissingArtifactError, match="tick use_drive"):
        sc.require_artifact(stack_home / "tokenizer" / "tokenizer.json", "01_tokenizer")
    monkeypatch.setenv("STACK_HOME", str(rt.DRIVE_STACK_HOME))
    error = sc.MissingArtifactError("x not found: run notebooks/01_tokenizer first")
    assert str(error) == "x not found: run notebooks/01_tokenizer first"


# widget classes that ipywidgets 7.7 (Colab's) and 8.x both have
WIDGETS_IN_7_AND_8 = {"HTML", "Text", "Textarea", "Button", "FloatSlider", "IntSlider", "VBox", "HBox", "Output",
                      "Label", "Layout", "Dropdown", "Checkbox"}


def test_the_chat_panel_uses_widgets_that_colabs_ipywidgets_has():
    sources = "".join((ROOT / "notebooks" / name).read_text() for name in ("chat_session.py", "07_chat.py"))
    used = set(re.findall(r"\bwidgets\.(\w+)", sources))
    assert used and used <= WIDGETS_IN_7_AND_8, used - WIDGETS_IN_7_AND_8


def test_a_model_shape_that_cannot_be_built_is_one_line(stack_home, tiny_tokenizer):
    """GPTConfig's checks are settings errors: the twin names the setting in one line, as for a bad option."""
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    result = run_twin("03_pretrain", stack_home, "--head_dim=30")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "03_pretrain.py: error: model_dim 128 must be divisible by head_dim 30")


def test_core_eval_of_a_damaged_fine_tuned_checkpoint_names_its_notebook(stack_home, tiny_tokenizer):
    """04 scores any run's checkpoint: a damaged one of the sft run is 05_sft's to write again, not 03_pretrain's."""
    shutil.copytree(tiny_tokenizer, stack_home / "tokenizer")
    (stack_home / "checkpoints" / "sft").mkdir(parents=True)
    (stack_home / "checkpoints" / "sft" / "step_000004.pt").write_bytes(b"not a checkpoint")
    result = run_twin("04_core_eval", stack_home, "--run_name=sft")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "notebooks/05_sft" in result.stderr and "03_pretrain" not in result.stderr, result.stderr[-2000:]
