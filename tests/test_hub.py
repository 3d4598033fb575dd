"""data/pretrain.py's hub corpus download and data/hub.py's shard push/pull, through huggingface_hub's real code
(hf_hub_download, snapshot_download, HfApi.create_repo / upload_folder) against a local stand-in for the Hub
(tests/hubserver.py). Any request to a host other than the local server fails the test instead of silently
falling back to files already on disk."""
from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hubserver import FakeHub  # noqa: E402

import stackcore as sc  # noqa: E402
from data.hub import pull_shards, push_shards  # noqa: E402
from data.pretrain import HUB_CORPORA, download_hub_corpus, iter_documents  # noqa: E402

FAKE_TOKEN = "hf_fake_token_for_the_local_hub"
CLIMBMIX = HUB_CORPORA["climbmix"].repo_id  # karpathy/climbmix-400b-shuffle, last shard 6542
SHARD_REPO = "someone/decoderstack-shards"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hub on 127.0.0.1 and a huggingface_hub that talks to it for real: token from HF_TOKEN, its cache under
    tmp_path, online mode, and an HTTP client that refuses any other host."""
    from huggingface_hub import constants, set_client_factory
    from huggingface_hub.utils import _http

    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # real requests, to the local server only
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))  # snapshot_download writes refs there
    monkeypatch.setenv("HF_XET_CACHE", str(tmp_path / "xet"))  # hf_xet's session (upload pipeline) writes logs there
    monkeypatch.setenv("HF_XET_TELEMETRY_ENABLED", "0")

    def only_local(request):
        if request.url.host != "127.0.0.1":
            raise AssertionError(f"huggingface_hub tried to reach {request.url} instead of the local hub")

    def guarded_client():
        client = _http.default_client_factory()
        client.event_hooks["request"].append(only_local)
        return client

    previous_factory = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(guarded_client)
    server = FakeHub(tmp_path / "hub").start()
    try:
        yield server
    finally:
        server.stop()
        set_client_factory(previous_factory)


def write_parquet(path: Path, docs: list[str]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=2)
    return path.read_bytes()


def served_bodies(hub: FakeHub, repo_id: str) -> int:
    """GETs of file bodies (not HEADs, not API calls) the server answered for `repo_id`."""
    return hub.count("GET", f"/datasets/{repo_id}/resolve/")


def test_download_hub_corpus_fetches_train_and_val_shards_once(hub, tmp_path):
    docs = {0: [f"train zero {i} " + "x" * i for i in range(5)],
            1: [f"train one {i} üñí" for i in range(3)],
            6542: ["validation a", "validation b", "validation c"]}
    served = tmp_path / "hub" / CLIMBMIX
    for index, texts in docs.items():
        write_parquet(served / f"shard_{index:05d}.parquet", texts)
    write_parquet(served / "shard_00002.parquet", ["not requested"])  # beyond train_shards=2: never downloaded
    dest = tmp_path / "downloads"

    files = download_hub_corpus("climbmix", 2, dest, endpoint=hub.url)

    local = (dest / "climbmix").resolve()
    assert [p.resolve() for p in files.train] == [local / "shard_00000.parquet", local / "shard_00001.parquet"]
    assert [p.resolve() for p in files.val] == [local / "shard_06542.parquet"]
    for path in [*files.train, *files.val]:
        assert path.read_bytes() == (served / path.name).read_bytes()
    assert not (local / "shard_00002.parquet").exists()
    assert list(iter_documents(files, "train")) == docs[0] + docs[1]
    assert list(iter_documents(files, "val")) == docs[6542]
    assert served_bodies(hub, CLIMBMIX) == 3
    assert hub.count("GET", f"/datasets/{CLIMBMIX}/resolve/main/shard_00002") == 0
    assert all(auth == f"Bearer {FAKE_TOKEN}" for auth in hub.authorization)

    # Files already there are kept: huggingface_hub may re-validate them (HEAD), but downloads no body again.
    heads = hub.count("HEAD")
    again = download_hub_corpus("climbmix", 2, dest, endpoint=hub.url)
    assert again.train == files.train and again.val == files.val
    assert served_bodies(hub, CLIMBMIX) == 3
    assert hub.count("HEAD") > heads  # ...and it really asked the server, rather than never checking
    assert list(iter_documents(again, "val")) == docs[6542]

    # A shard that changed on the Hub is downloaded again (the ETag no longer matches), and only that one.
    write_parquet(served / "shard_00001.parquet", ["a newer document"])
    third = download_hub_corpus("climbmix", 2, dest, endpoint=hub.url)
    assert served_bodies(hub, CLIMBMIX) == 4
    assert list(iter_documents(third, "train")) == docs[0] + ["a newer document"]
    assert hub.unexpected == []


@pytest.mark.parametrize("name, train_shards", [("climbmix", 0), ("climbmix", -1), ("climbmix", 6543),
                                                ("climbmix", 10_000), ("fineweb-edu", 1823)])
def test_download_hub_corpus_rejects_shard_counts_out_of_range(hub, tmp_path, name, train_shards):
    with pytest.raises(ValueError, match="train_shards must be in"):
        download_hub_corpus(name, train_shards, tmp_path / "downloads", endpoint=hub.url)
    assert hub.requests == []  # rejected before any download
    assert not (tmp_path / "downloads").exists()


def test_download_hub_corpus_accepts_the_full_range(hub, tmp_path):
    """The upper bound is inclusive: train_shards == last_shard uses every shard but the validation one."""
    corpus = HUB_CORPORA["fineweb-edu"]
    served = tmp_path / "hub" / corpus.repo_id
    # Serve only shard 0 and the val shard: the call must get past the range check and fail on shard 1.
    write_parquet(served / "shard_00000.parquet", ["only"])
    write_parquet(served / f"shard_{corpus.last_shard:05d}.parquet", ["val"])
    from huggingface_hub.errors import EntryNotFoundError

    with pytest.raises(EntryNotFoundError):
        download_hub_corpus("fineweb-edu", corpus.last_shard, tmp_path / "downloads", endpoint=hub.url)
    assert hub.count("HEAD", f"/datasets/{corpus.repo_id}/resolve/main/shard_00001.parquet") >= 1
    assert hub.unexpected == []


def make_stack_home(home: Path) -> dict[str, bytes]:
    """A STACK_HOME with a tokenizer, pretrain shards and an unrelated run file; returns the hub-bound files."""
    rng = random.Random(0)
    (home / "tokenizer").mkdir(parents=True)
    (home / "shards" / "pretrain").mkdir(parents=True)
    (home / "tokenizer" / "tokenizer.tiktoken").write_bytes(rng.randbytes(3000))
    (home / "tokenizer" / "tokenizer.json").write_text('{"vocab_size": 512, "special": ["<|bos|>"]}')
    sc.write_shard(home / "shards" / "pretrain" / "train_000000.bin",
                   np.random.default_rng(0).integers(0, 512, 4000), vocab_size=512)
    sc.write_shard(home / "shards" / "pretrain" / "val_000000.bin",
                   np.random.default_rng(1).integers(0, 512, 1000), vocab_size=512)
    (home / "runs").mkdir()
    (home / "runs" / "x.json").write_text('{"loss": 1.0}')
    return {p.relative_to(home).as_posix(): p.read_bytes()
            for p in sorted(home.rglob("*")) if p.is_file() and not p.relative_to(home).parts[0] == "runs"}


def test_pull_shards_downloads_tokenizer_and_shards_only(hub, tmp_path, stack_home):
    source = make_stack_home(tmp_path / "source")
    for path, data in source.items():
        hub.add_file(SHARD_REPO, path, data)
    hub.add_file(SHARD_REPO, "README.md", b"---\nlicense: mit\n---\n# shards\n")
    hub.add_file(SHARD_REPO, "notes/other.txt", b"not part of a shard repo's payload")

    assert pull_shards(SHARD_REPO, stack_home, endpoint=hub.url) == stack_home

    pulled = {p.relative_to(stack_home).as_posix(): p.read_bytes()
              for p in stack_home.rglob("*") if p.is_file() and ".cache" not in p.relative_to(stack_home).parts}
    assert pulled == source  # byte-identical, and nothing else (no README.md, no notes/)
    assert np.array_equal(sc.read_shard(stack_home / "shards" / "pretrain" / "train_000000.bin"),
                          np.random.default_rng(0).integers(0, 512, 4000))
    assert served_bodies(hub, SHARD_REPO) == len(source)
    assert not any("README.md" in path or "notes/" in path for _, path in hub.requests)
    assert hub.count("GET", f"/api/datasets/{SHARD_REPO}/tree/") == 1  # the listing after the download reads its cache
    assert hub.unexpected == []


def test_pull_shards_replaces_the_shard_sets_it_brings(hub, tmp_path, stack_home):
    """A set the repo brings replaces the local one whole: with the repo's own stamp, or none where it has none
    (pushed before stamps existed) instead of the stamp naming the tokenizer being replaced, and without the local
    shards the repo lacks (a longer local set), which the loaders would read with the new tokenizer. A set the repo
    does not bring keeps its stamp, so it is refused until 02_sharding writes it again."""
    from data.tokenizing import SHARDS_STAMP

    source = make_stack_home(tmp_path / "source")
    source[f"shards/pretrain/{SHARDS_STAMP}"] = b"aaaaaaaaaaaa\n"
    source["shards/core/arc.bin"] = source["shards/pretrain/val_000000.bin"]
    for path, data in source.items():
        hub.add_file(SHARD_REPO, path, data)
    for shard_set in ("pretrain", "core", "sft"):
        (stack_home / "shards" / shard_set).mkdir(parents=True)
        (stack_home / "shards" / shard_set / SHARDS_STAMP).write_text("bbbbbbbbbbbb\n")
    stale = stack_home / "shards" / "pretrain" / "train_000001.bin"
    sc.write_shard(stale, np.arange(100), vocab_size=512)

    pull_shards(SHARD_REPO, stack_home, endpoint=hub.url)
    assert (stack_home / "shards" / "pretrain" / SHARDS_STAMP).read_text() == "aaaaaaaaaaaa\n"
    assert not (stack_home / "shards" / "core" / SHARDS_STAMP).exists()
    assert not stale.exists()
    assert [p.name for p in sc.list_shards(stack_home / "shards" / "pretrain", "train")] == ["train_000000.bin"]
    assert (stack_home / "shards" / "sft" / SHARDS_STAMP).read_text() == "bbbbbbbbbbbb\n"
    assert hub.unexpected == []


def test_sharding_says_when_the_pulled_tokenizer_replaced_another(hub, tmp_path, stack_home, tiny_tokenizer):
    """02 with --pretokenized_repo replaces the local tokenizer: one retrained at the same size is named by its
    fingerprint, since the checkpoints made with it no longer match; the pulled shards keep the repo's stamp."""
    import shutil
    import subprocess

    from conftest import ROOT
    from data.synthetic import synthetic_documents
    from data.tokenizing import SHARDS_STAMP

    def run_02(home, *args):
        env = {**os.environ, "STACK_HOME": str(home), "STACK_PRESET": "tiny", "HF_ENDPOINT": hub.url,
               "HF_HUB_OFFLINE": "0", "HF_HUB_CACHE": str(tmp_path / "hf_cache")}
        result = subprocess.run([sys.executable, "notebooks/02_sharding.py", *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    source = tmp_path / "source"
    shutil.copytree(tiny_tokenizer, source / "tokenizer")
    run_02(source)
    for path in [*(source / "tokenizer").iterdir(), *(source / "shards" / "pretrain").iterdir()]:
        hub.add_file(SHARD_REPO, path.relative_to(source).as_posix(), path.read_bytes())
    local = sc.Tokenizer.train(synthetic_documents(800, seed=11), 512)
    local.save(stack_home / "tokenizer")

    said = run_02(stack_home, f"--pretokenized_repo={SHARD_REPO}")
    pulled = sc.Tokenizer.load(tiny_tokenizer).fingerprint
    replaced = f"note: {SHARD_REPO}'s tokenizer replaced another one ({local.fingerprint}) in {stack_home}/tokenizer"
    assert replaced in said
    assert (stack_home / "shards" / "pretrain" / SHARDS_STAMP).read_text().strip() == pulled
    assert "replaced another one" not in run_02(stack_home, f"--pretokenized_repo={SHARD_REPO}")  # the same one


def test_pull_shards_rejects_a_repo_without_tokenizer(hub, tmp_path):
    hub.add_file("someone/plain-dataset", "README.md", b"# not shards\n")
    hub.add_file("someone/plain-dataset", "shards/pretrain/train_000000.bin", b"\0" * 64)
    with pytest.raises(FileNotFoundError, match="not a DecoderStack shard repo"):
        pull_shards("someone/plain-dataset", tmp_path / "pulled", endpoint=hub.url)
    assert (tmp_path / "pulled" / "shards" / "pretrain" / "train_000000.bin").read_bytes() == b"\0" * 64

    from huggingface_hub.errors import RepositoryNotFoundError

    with pytest.raises(RepositoryNotFoundError):
        pull_shards("someone/no-such-repo", tmp_path / "other", endpoint=hub.url)
    assert hub.unexpected == []


@pytest.mark.parametrize("xet", [True, False], ids=["hf_xet-pipeline", "no-xet-create_commit"])
def test_push_then_pull_round_trips_tokenizer_and_shards(hub, tmp_path, stack_home, monkeypatch, xet):
    """With hf_xet installed upload_folder goes through its streamed pipeline, without it through create_commit;
    either way the server answers preupload with uploadMode "regular", so the bytes travel base64 in the NDJSON
    commit and no Xet/LFS transfer happens."""
    from huggingface_hub import constants
    from huggingface_hub.utils._runtime import is_xet_available

    if xet and not is_xet_available():
        pytest.skip("hf_xet is not installed: upload_folder has only the create_commit path here")
    from huggingface_hub import _upload_pipeline

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    assert is_xet_available() is xet
    pipelined = []  # upload_folder imports pipelined_upload at call time: count the calls that took that path
    real_pipelined_upload = _upload_pipeline.pipelined_upload
    monkeypatch.setattr(_upload_pipeline, "pipelined_upload",
                        lambda *a, **kw: pipelined.append(1) or real_pipelined_upload(*a, **kw))
    expected = make_stack_home(stack_home)

    url = push_shards(SHARD_REPO, stack_home, endpoint=hub.url)

    assert url.startswith(f"{hub.url}/datasets/{SHARD_REPO}/commit/")
    assert hub.created == [{"name": "decoderstack-shards", "organization": "someone", "visibility": "private",
                            "type": "dataset"}]
    assert hub.files(SHARD_REPO) == expected  # runs/x.json stayed home
    assert len(hub.commits) == 1 and hub.commits[0]["header"]["summary"] == "DecoderStack shards"
    assert len(pipelined) == int(xet)
    assert url.endswith(hub.commits[0]["oid"])
    assert not any("runs" in path or "xet" in path for _, path in hub.requests)
    assert all(auth == f"Bearer {FAKE_TOKEN}" for auth in hub.authorization)

    fresh = tmp_path / "fresh_home"
    pull_shards(SHARD_REPO, fresh, endpoint=hub.url)
    for path, data in expected.items():
        assert (fresh / path).read_bytes() == data, path
    assert not (fresh / "runs").exists()

    # Pushing again: the repo exists (409, tolerated) and nothing changed, so no new commit; a changed shard is
    # committed alone.
    push_shards(SHARD_REPO, stack_home, endpoint=hub.url)
    assert len(hub.commits) == 1
    sc.write_shard(stack_home / "shards" / "pretrain" / "val_000000.bin", np.arange(50), vocab_size=512)
    url = push_shards(SHARD_REPO, stack_home, endpoint=hub.url)
    assert len(hub.commits) == 2 and hub.commits[1]["files"] == ["shards/pretrain/val_000000.bin"]
    assert url.endswith(hub.commits[1]["oid"])
    pull_shards(SHARD_REPO, fresh, endpoint=hub.url)
    assert np.array_equal(sc.read_shard(fresh / "shards" / "pretrain" / "val_000000.bin"), np.arange(50))
    assert hub.unexpected == []
