"""The pretraining corpus: ClimbMix (nanochat's default since March 2026), FineWeb-Edu, local files, or the
synthetic corpus of the `tiny` preset. Hub corpora are parquet shards with a `text` column whose last shard is
the validation split (nanochat's convention); they are downloaded with huggingface_hub."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from data.records import DataFileError, converted, field, read_records
from data.synthetic import synthetic_documents
from notebooks.config import StackConfig, above, one_of
from stackcore import artifact_dir


@dataclass(frozen=True)
class HubCorpus:
    repo_id: str
    last_shard: int  # index of the final shard, which holds the validation documents

    def filename(self, index: int) -> str:
        return f"shard_{index:05d}.parquet"


HUB_CORPORA = {
    "climbmix": HubCorpus("karpathy/climbmix-400b-shuffle", last_shard=6542),
    "fineweb-edu": HubCorpus("karpathy/fineweb-edu-100b-shuffle", last_shard=1822),
}
CORPUS_NAMES = (*HUB_CORPORA, "local", "synthetic")
SYNTHETIC_TRAIN_DOCS, SYNTHETIC_VAL_DOCS = 3000, 200


@dataclass(frozen=True)
class CorpusFiles:
    """Where one split's documents come from: files on disk, or the synthetic generator."""
    train: list[Path]
    val: list[Path]
    synthetic: bool = False


def download_hub_corpus(name: str, train_shards: int, dest: Path, endpoint: str | None = None) -> CorpusFiles:
    """Download the first `train_shards` parquet shards and the validation shard of a hub corpus into `dest`
    (files already there are kept). `endpoint` points huggingface_hub at another server (tests use a local one)."""
    from huggingface_hub import hf_hub_download

    corpus = HUB_CORPORA[name]
    if not 1 <= train_shards <= corpus.last_shard:
        raise ValueError(f"train_shards must be in [1, {corpus.last_shard}] for {name}, got {train_shards}")

    def fetch(index: int) -> Path:
        return Path(hf_hub_download(corpus.repo_id, corpus.filename(index), repo_type="dataset",
                                    local_dir=dest / name, endpoint=endpoint))

    return CorpusFiles(train=[fetch(i) for i in range(train_shards)], val=[fetch(corpus.last_shard)])


def local_corpus(train_glob: str, val_glob: str) -> CorpusFiles:
    """Local .txt (one document per file), .jsonl / .jsonl.gz / .jsonl.xz (a `text` field per line) or .parquet (`text`
    column)."""
    def expand(pattern: str, role: str) -> list[Path]:
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
        if not paths:
            raise FileNotFoundError(f"no files match {role} {pattern!r}")
        return paths

    return CorpusFiles(train=expand(train_glob, "local_files"), val=expand(val_glob, "local_val_files"))


def resolve_corpus(corpus: str, train_shards: int, local_files: str, local_val_files: str,
                   download_dir: Path, endpoint: str | None = None) -> CorpusFiles:
    if corpus in HUB_CORPORA:
        return download_hub_corpus(corpus, train_shards, download_dir, endpoint)
    if corpus == "local":
        if not local_files or not local_val_files:
            raise ValueError("corpus=local needs --local_files=GLOB and --local_val_files=GLOB")
        return local_corpus(local_files, local_val_files)
    if corpus == "synthetic":
        return CorpusFiles(train=[], val=[], synthetic=True)
    raise ValueError(f"unknown corpus {corpus!r}; valid: {', '.join(CORPUS_NAMES)}")


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one file, by its extension; a bad record or a damaged file is an error naming the file (and
    line)."""
    name = path.name
    if name.endswith((".parquet", ".jsonl", ".jsonl.gz", ".jsonl.xz")):
        yield from converted(read_records([path], columns=["text"]), lambda record: field(record, "text"))
    elif name.endswith(".txt"):
        try:
            yield path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataFileError(f"{path}: not readable as UTF-8 text ({error})") from None
    else:
        raise ValueError(f"{path}: unsupported file type (use .txt, .jsonl, .jsonl.gz, .jsonl.xz or .parquet)")


def iter_documents(files: CorpusFiles, split: str, max_chars: int = 0) -> Iterator[str]:
    """Documents of `split` ("train" or "val") in a fixed order, stopping once `max_chars` characters were yielded
    (0: no limit)."""
    if files.synthetic:
        docs: Iterator[str] = iter(synthetic_documents(SYNTHETIC_TRAIN_DOCS, seed=0) if split == "train"
                                   else synthetic_documents(SYNTHETIC_VAL_DOCS, seed=1))
    else:
        docs = (doc for path in (files.train if split == "train" else files.val) for doc in read_documents(path))
    chars = 0
    for doc in docs:
        yield doc
        chars += len(doc)
        if max_chars and chars >= max_chars:
            return


@dataclass
class CorpusConfig(StackConfig):
    """Which pretraining text to use; shared by 01_tokenizer and 02_sharding so both read the same documents."""
    corpus: str = "climbmix"  # climbmix | fineweb-edu | local | synthetic
    train_shards: int = 8  # hub parquet shards to download for training (plus the validation shard)
    local_files: str = ""  # corpus=local: glob of training files (.txt, .jsonl, .jsonl.gz, .jsonl.xz, .parquet)
    local_val_files: str = ""  # corpus=local: glob of validation files
    PRESETS = {"tiny": dict(corpus="synthetic"), "colab": dict(train_shards=4)}
    LIMITS = {"corpus": one_of(*CORPUS_NAMES), "train_shards": above(0)}

    def resolve(self) -> CorpusFiles:
        return resolve_corpus(self.corpus, self.train_shards, self.local_files, self.local_val_files,
                              artifact_dir("downloads"))
