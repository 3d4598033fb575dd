"""Tokenizing a corpus in worker processes: how 02_sharding encodes the pretraining documents (tokenize_parallel)
and renders the SFT conversations (data/sft.py's render_parallel); which tokenizer wrote a folder of shards (a stamp
of its fingerprint that 02 writes and 03-06 check); and the published encodings 01_tokenizer compares with
(reference_encoding)."""
from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np

from stackcore import ShardError, Tokenizer, artifact_dir

ItemT = TypeVar("ItemT")
SHARDS_STAMP = "tokenizer.fingerprint"  # in each shard folder: the fingerprint of the tokenizer that wrote it
UNFINISHED = "unfinished"  # the stamp while 02 writes a folder
_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(directory: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(Path(directory))


def _work_with_tokenizer(job: tuple[Callable[[Tokenizer, Any], list[Any]], Any]) -> list[Any]:
    work, batch = job
    assert _worker_tokenizer is not None
    return work(_worker_tokenizer, batch)


def _encode_with_bos(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.uint32) for ids in tokenizer.encode_batch(texts, True, num_threads=1)]


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def map_with_tokenizer(tokenizer_dir: Path, work: Callable[[Tokenizer, Any], list[ItemT]], batches: Iterable[Any],
                       workers: int) -> Iterator[ItemT]:
    """Every item of work(tokenizer, batch) for each batch, in input order, from `workers` processes that each load
    the tokenizer once. `work` is a module-level function, so that it reaches the workers by name. With workers <= 1
    it works in this process (faster for small inputs)."""
    if workers <= 1:
        tokenizer = Tokenizer.load(Path(tokenizer_dir))
        for batch in batches:
            yield from work(tokenizer, batch)
        return
    # fork: a spawned worker would re-run the calling script, which is a notebook twin with no __main__ guard
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _load_worker_tokenizer, (str(tokenizer_dir),)) as pool:
        for results in pool.imap(_work_with_tokenizer, ((work, batch) for batch in batches), chunksize=1):
            yield from results


def tokenize_parallel(tokenizer_dir: Path, docs: Iterable[str], workers: int, batch_docs: int = 256
                      ) -> Iterator[np.ndarray]:
    """Token ids of each document, BOS first, in input order, encoded by `workers` processes."""
    return map_with_tokenizer(tokenizer_dir, _encode_with_bos, batched(docs, batch_docs), workers)


def stamp_shards(directory: Path, tokenizer: Tokenizer | None) -> None:
    """Record in `directory` which tokenizer wrote its shards, once they are all written; with None, before writing
    them: a run cut short then leaves UNFINISHED, which readers refuse, not an earlier run's stamp vouching for a
    half-written folder."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SHARDS_STAMP).write_text((tokenizer.fingerprint if tokenizer else UNFINISHED) + "\n")


def check_shards_tokenizer(directory: Path, tokenizer: Tokenizer) -> None:
    """Refuse shards written by another tokenizer than `tokenizer`, even one of the same vocabulary size: their ids
    would be read as other text. Shards without a stamp (older ones, modded-nanogpt's) are taken as they are."""
    stamp = Path(directory) / SHARDS_STAMP
    if not stamp.is_file():
        return
    with open(stamp, "rb") as f:
        written_by = f.read(64).decode(errors="replace").strip()
    if written_by == UNFINISHED:
        raise ShardError(f"{stamp}: 02_sharding stopped before it had written every shard in {directory}: run "
                         f"notebooks/02_sharding again")
    if written_by != tokenizer.fingerprint:
        raise ShardError(f"{stamp}: the shards in {directory} were written by tokenizer {written_by!r}, but the "
                         f"tokenizer in {artifact_dir('tokenizer', create=False)} is {tokenizer.fingerprint!r} (01 "
                         f"trained another since): run notebooks/02_sharding again")


def reference_encoding(name: str, timeout_s: float = 30.0) -> Any:
    """tiktoken's published encoding `name` (gpt2, cl100k_base), downloaded once into tiktoken's cache. tiktoken
    fetches it with no timeout, so a network that drops packets would hold 01_tokenizer for minutes: past `timeout_s`
    this raises TimeoutError, leaving the fetch to a daemon thread that does not keep the process alive."""
    import tiktoken

    outcome: dict[str, Any] = {}

    def fetch() -> None:
        try:
            outcome["encoding"] = tiktoken.get_encoding(name)
        except Exception as error:  # handed to the caller below
            outcome["error"] = error

    thread = threading.Thread(target=fetch, name=f"tiktoken {name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"tiktoken's download of {name} gave no answer in {timeout_s:.0f} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["encoding"]
