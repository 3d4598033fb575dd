"""Shared fixtures: every test gets its own STACK_HOME, and the project root is importable."""
import fcntl
import os
import sys
import tempfile
from pathlib import Path

import pytest

# pytest -n 2 runs two workers on CI's two cores, and each notebook under test starts its own process: one thread
# per process keeps them from fighting over the cores (a decode step ran ~100x slower with 2 threads per process).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The real datasets are an opt-in: STACK_TEST_DATA names a folder laid out like the dev machines' shared/data (core/,
# gsm8k/, humaneval/, english/); .ci/run sets it when ../shared/data sits beside the checkout. The product never
# reads such a folder. A test that asks for the real_data fixture skips, naming the variable, when it is unset, and
# fails when it is set to a folder that lacks what the test reads.
TEST_DATA_VARIABLE = "STACK_TEST_DATA"


@pytest.fixture(autouse=True)
def stack_home(tmp_path, monkeypatch):
    home = tmp_path / "stack_home"
    monkeypatch.setenv("STACK_HOME", str(home))
    monkeypatch.delenv("STACK_PRESET", raising=False)
    return home


@pytest.fixture
def real_data() -> Path:
    """The folder STACK_TEST_DATA names."""
    folder = os.environ.get(TEST_DATA_VARIABLE, "")
    if not folder:
        pytest.skip(f"real datasets are opt-in: set {TEST_DATA_VARIABLE} to a copy of shared/data (.ci/run does when "
                    f"../shared/data is beside the checkout)")
    return Path(folder).expanduser()


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token BPE trained on the synthetic corpus, saved once for the whole session."""
    import stackcore as sc
    from data.synthetic import synthetic_documents

    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = sc.Tokenizer.train(synthetic_documents(800, seed=3), 512)
    tokenizer.save(directory)
    return directory


def pytest_terminal_summary(terminalreporter):
    """The hostile-input modules (tests/test_hostile_*.py) are the spec for bad input: say how many cases ran."""
    reports = [report for outcome in ("passed", "failed") for report in terminalreporter.stats.get(outcome, [])
               if report.when == "call" and "test_hostile_" in report.nodeid]
    if reports:
        failed = sum(report.failed for report in reports)
        terminalreporter.write_line(f"hostile-input cases: {len(reports)} ran, {failed} failed")


@pytest.fixture
def sandbox_alone():
    """One sandboxing test at a time across xdist workers: where sandboxed programs run as `nobody` they share its
    process limit (RLIMIT_NPROC), so a hostile program that takes every thread would make a concurrent check of a
    correct program fail (data/sandbox.py, PROCESSES)."""
    with open(Path(tempfile.gettempdir()) / "decoderstack-sandbox-tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
