"""Shared fixtures: every test gets its own STACK_HOME, and the project root is importable."""
import os
import sys
from pathlib import Path

import pytest

# pytest -n 2 runs two workers on CI's two cores, and each notebook under test starts its own process: one thread
# per process keeps them from fighting over the cores (a decode step ran ~100x slower with 2 threads per process).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True)
def stack_home(tmp_path, monkeypatch):
    home = tmp_path / "stack_home"
    monkeypatch.setenv("STACK_HOME", str(home))
    monkeypatch.delenv("STACK_PRESET", raising=False)
    return home


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 512-token BPE trained on the synthetic corpus, saved once for the whole session."""
    import stackcore as sc
    from data.synthetic import synthetic_documents

    directory = tmp_path_factory.mktemp("tokenizer")
    tokenizer = sc.Tokenizer.train(synthetic_documents(800, seed=3), 512)
    tokenizer.save(directory)
    return directory
