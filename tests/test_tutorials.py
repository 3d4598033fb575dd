"""The guides in tutorials/: the ```bash blocks of each guide run one after another in ONE shell, as a reader types
them (an `export` in one block reaches the next), guide after guide, from the repository root, in the tiny preset on
the CPU, with one STACK_HOME (later guides use what earlier ones made). ```text blocks (GPU, node, network) are not
run."""
import os
import re
import subprocess
import time

from conftest import ROOT

TUTORIALS = ROOT / "tutorials"
GUIDES = sorted(TUTORIALS.glob("[0-9][0-9]_*.md"))
FENCE = re.compile(r"^```(\w*)[ \t]*$", re.M)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced block: fences alternate between opening (with a language) and closing."""
    fences = list(FENCE.finditer(text))
    assert len(fences) % 2 == 0, "an unclosed ``` fence"
    return [(opening.group(1), text[opening.end() + 1:closing.start()])
            for opening, closing in zip(fences[::2], fences[1::2])]


def test_guides_are_listed_and_every_block_says_whether_it_runs():
    index = (TUTORIALS / "README.md").read_text()
    assert GUIDES
    for guide in GUIDES:
        assert f"]({guide.name})" in index, f"{guide.name} is missing from tutorials/README.md"
        languages = {language for language, _ in code_blocks(guide.read_text())}
        assert languages <= {"bash", "text"}, f"{guide.name}: blocks must be ```bash (run) or ```text (not run)"


def run_in_one_shell(blocks: list[str], cwd, env) -> subprocess.CompletedProcess:
    """Run `blocks` in order in one bash session; before each, a `### block N` line on stderr says where it got."""
    script = "\n".join(f"echo '### block {i}: {block.splitlines()[0][:60]}' >&2\n{block}"
                       for i, block in enumerate(blocks, 1))
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=1800)


def test_one_shell_keeps_an_export_for_the_next_block(tmp_path):
    result = run_in_one_shell(["export DEMO=set", 'echo "DEMO is $DEMO"'], tmp_path, dict(os.environ))
    assert result.returncode == 0 and "DEMO is set" in result.stdout


def test_every_guide_runs_in_one_shell_in_the_tiny_preset(tmp_path):
    home = tmp_path / "stack_home"
    env = {**os.environ, "STACK_HOME": str(home), "STACK_PRESET": "tiny", "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # as on CI: the torchrun blocks start two CPU ranks
    outputs = {}
    for guide in GUIDES:
        blocks = [block for language, block in code_blocks(guide.read_text()) if language == "bash"]
        started = time.time()
        result = run_in_one_shell(blocks, ROOT, env)
        print(f"{time.time() - started:6.1f} s  {guide.name}: {len(blocks)} block(s)", flush=True)
        assert result.returncode == 0, f"{guide.name}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        outputs[guide.name] = result.stdout
    assert (home / "checkpoints" / "ddp" / "step_000004.rank1.pt").is_file()
    assert (home / "vocab_384" / "runs" / "pretrain" / "summary.json").is_file()
    assert "Self CPU" in outputs["04_profiler_trace.md"] and (home / "runs" / "profile" / "trace.json").is_file()
    assert "| 994.0 | 527453 | 40.2 | 51.6 |" in outputs["05_adding_a_record.md"]
    errors = [float(e) for e in re.findall(r"max \|decode - full\| = (\S+)", outputs["06_kv_cache_and_left_out_tricks.md"])]
    assert len(errors) == 3 and errors[0] < 1e-5 and errors[1] > 0.1 and errors[2] < 1e-5
