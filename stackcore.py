"""DecoderStack's one shared module: everything the notebooks import, in the order a training step uses it.

Sections (and the notebooks that call them):
  1. Configuration and presets ........ every notebook (the first cell builds its config here)
  2. Artifacts and devices ............ every notebook (STACK_HOME layout, device and dtype choice)
  3. Tokenizer ........................ 01_tokenizer, 02_sharding, 07_chat
  4. Shards ........................... 02_sharding writes them; 03-06 read them
  5. Triton kernels ................... 03_pretrain (through the optimizer)
  6. Attention backends ............... 03-07 (through the model)
  7. Model ............................ 03-07
  8. Optimizer and schedules .......... 03_pretrain, 05_sft, 06_rl
  9. Pretraining loader ............... 03_pretrain
 10. Evaluation: bits per byte ........ 03_pretrain, 04_core_eval
 11. Checkpoints and run logs ......... 03-07

The notebooks keep the training loops in view; this file holds the reusable and performance-critical parts.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence, TypeVar

import numpy as np

# ---------------------------------------------------------------------------------------------
# 1. Configuration and presets (used by every notebook)
# ---------------------------------------------------------------------------------------------
# Each notebook declares a dataclass of defaults with a PRESETS table. A value is taken from, in rising order:
# the dataclass default, the preset, a STACK_<NAME> environment variable, a --name=value argument (twins only).

PRESET_NAMES = ("tiny", "colab", "speedrun", "node")
ConfigT = TypeVar("ConfigT")


class ConfigError(ValueError):
    """A bad configuration: unknown key, unparsable value or unknown preset."""


def in_notebook_kernel() -> bool:
    """True inside a Jupyter/Colab kernel, where sys.argv belongs to the kernel and must be ignored."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in shell.config


def parse_cli_overrides(argv: Sequence[str]) -> dict[str, str]:
    """`--key=value`, `--key value` and bare `--flag` (meaning true) into a dict of raw strings."""
    overrides: dict[str, str] = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = args.pop(0) if args and not args[0].startswith("--") else "true"
        overrides[key.replace("-", "_")] = value
    return overrides


def parse_value(name: str, raw: Any, kind: Any) -> Any:
    """Convert a raw override to the field's type, with an error that names the field and the expected type."""
    if not isinstance(raw, str):
        return raw
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int:
            number = float(raw.replace("_", ""))  # accepts 524288, 524_288 and 5e5
            if not number.is_integer():
                raise ValueError(raw)
            return int(number)
        if kind is float:
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"bad value {raw!r} for {name}: expected {getattr(kind, '__name__', kind)}") from None


def choose_preset(cli: dict[str, str], environ: typing.Mapping[str, str]) -> str:
    """--preset beats STACK_PRESET; with neither, pick from the hardware (CPU: tiny, several GPUs: node, H100/H200:
    speedrun, any other GPU: colab)."""
    preset = cli.pop("preset", None) or environ.get("STACK_PRESET") or auto_preset()
    if preset not in PRESET_NAMES:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESET_NAMES)}")
    return preset


def auto_preset() -> str:
    import torch

    if not torch.cuda.is_available():
        return "tiny"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "node"
    name = torch.cuda.get_device_name()
    return "speedrun" if ("H100" in name or "H200" in name) else "colab"


@dataclass
class StackConfig:
    """Base of every notebook's config. Subclasses add fields and a PRESETS table {preset: {field: value}};
    presets of parent classes apply first, so a shared base (the corpus, say) keeps its own presets."""
    preset: str = ""
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}


def preset_values(cls: type, preset: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        values.update(vars(klass).get("PRESETS", {}).get(preset, {}))
    return values


def configure(cls: type[ConfigT], argv: Sequence[str] | None = None,
              environ: typing.Mapping[str, str] | None = None) -> ConfigT:
    """Build a notebook's config. argv defaults to sys.argv[1:] in a script and to nothing in a notebook kernel."""
    if argv is None:
        argv = [] if in_notebook_kernel() else sys.argv[1:]
    environ = os.environ if environ is None else environ
    cli = parse_cli_overrides(argv)
    preset = choose_preset(cli, environ)
    kinds = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "preset"]
    unknown = sorted(set(cli) - set(names))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join('--' + k for k in unknown)} for {cls.__name__}; "
                          f"valid keys: {', '.join(names)}")
    values = preset_values(cls, preset)
    values.update({n: environ[f"STACK_{n.upper()}"] for n in names if f"STACK_{n.upper()}" in environ})
    values.update(cli)
    parsed = {name: parse_value(name, raw, kinds[name]) for name, raw in values.items()}
    return cls(preset=preset, **parsed)


def describe_config(cfg: Any) -> str:
    """One `key = value` line per field, for the top of a run's log."""
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    return "\n".join(f"{f.name:<{width}} = {getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg))


# ---------------------------------------------------------------------------------------------
# 2. Artifacts and devices (used by every notebook)
# ---------------------------------------------------------------------------------------------
# STACK_HOME/tokenizer, shards, checkpoints and runs hold what one notebook leaves for the next.

ARTIFACT_KINDS = ("tokenizer", "shards", "checkpoints", "runs", "downloads")


def stack_home() -> Path:
    return Path(os.environ.get("STACK_HOME", "~/.cache/decoderstack")).expanduser()


def artifact_dir(kind: str, create: bool = True) -> Path:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; valid: {', '.join(ARTIFACT_KINDS)}")
    path = stack_home() / kind
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


class MissingArtifactError(FileNotFoundError):
    """An earlier notebook's output is not where this one looks for it."""


def require_artifact(path: Path, made_by: str) -> Path:
    """Return `path` if it exists, else stop with a message naming the notebook that makes it."""
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(f"{path} not found: run notebooks/{made_by} first "
                                   f"(STACK_HOME is {stack_home()})")
    return path


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_compute_dtype(device: str):
    """bf16 where the GPU has it (Ampere and newer), fp16 on older GPUs such as the T4, fp32 on the CPU."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.get_device_capability()[0] >= 8 else torch.float16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# 3. Tokenizer (used by 01_tokenizer, 02_sharding, 07_chat)
# ---------------------------------------------------------------------------------------------
# Byte-level BPE trained by rustbpe, run by tiktoken. Saved as tiktoken's own rank file plus a small JSON of the
# split pattern and special tokens, so `tiktoken.Encoding(..., mergeable_ranks=load_tiktoken_bpe(file))` loads it.

# GPT-4's split pattern with numbers split into runs of at most two digits (nanochat found 2 best at a 32k vocab).
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
TOKENIZER_RANKS = "tokenizer.tiktoken"
TOKENIZER_META = "tokenizer.json"
TOKEN_BYTES = "token_bytes.npy"


class Tokenizer:
    """A tiktoken Encoding with our special tokens, plus the byte length of every token for bits per byte."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "decoderstack"):
        import tiktoken

        self.ranks, self.pattern, self.name = ranks, pattern, name
        self.specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.specials)
        self.bos_id = self.special_id("<|bos|>")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, name: str = "decoderstack") -> "Tokenizer":
        """Train a byte-level BPE whose vocabulary, special tokens included, has exactly `vocab_size` entries."""
        import rustbpe

        merges_wanted = vocab_size - len(SPECIAL_TOKENS)
        if merges_wanted < 256:
            raise ValueError(f"vocab_size {vocab_size} is too small: it needs 256 byte tokens "
                             f"+ {len(SPECIAL_TOKENS)} special tokens")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), merges_wanted, pattern=SPLIT_PATTERN)
        ranks = {bytes(piece): rank for piece, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < merges_wanted:
            raise ValueError(f"the training text supports only {len(ranks)} merges, fewer than the "
                             f"{merges_wanted} that vocab_size {vocab_size} asks for: give more text or a smaller vocab")
        return cls(ranks, trainer.get_pattern(), name)

    def save(self, directory: Path) -> None:
        """Write tiktoken's rank file, a JSON of name, pattern and special tokens, and the token-bytes table."""
        import base64

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        lines = (f"{base64.b64encode(piece).decode()} {rank}\n" for piece, rank in sorted(self.ranks.items(),
                                                                                         key=lambda kv: kv[1]))
        (directory / TOKENIZER_RANKS).write_text("".join(lines))  # tiktoken's format: base64 token, space, rank
        meta = {"name": self.name, "pattern": self.pattern, "special_tokens": self.specials}
        (directory / TOKENIZER_META).write_text(json.dumps(meta, indent=1))
        np.save(directory / TOKEN_BYTES, self.token_bytes())

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        from tiktoken.load import load_tiktoken_bpe

        directory = Path(directory)
        ranks_file = require_artifact(directory / TOKENIZER_RANKS, made_by="01_tokenizer")
        meta = json.loads(require_artifact(directory / TOKENIZER_META, made_by="01_tokenizer").read_text())
        tokenizer = cls(load_tiktoken_bpe(str(ranks_file)), meta["pattern"], meta["name"])
        if tokenizer.specials != meta["special_tokens"]:
            raise ValueError(f"{directory / TOKENIZER_META}: special tokens differ from this version's "
                             f"{list(SPECIAL_TOKENS)}")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def special_id(self, token: str) -> int:
        return self.enc.encode_single_token(token)

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        """Plain text to ids. Special-token strings inside the text are encoded as ordinary text, never as specials."""
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id, *ids] if prepend_bos else ids

    def encode_batch(self, texts: list[str], prepend_bos: bool = False, num_threads: int = 8) -> list[list[int]]:
        batch = self.enc.encode_ordinary_batch(texts, num_threads=num_threads)
        return [[self.bos_id, *ids] for ids in batch] if prepend_bos else batch

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def token_bytes(self) -> np.ndarray:
        """UTF-8 byte length of each token id; 0 for special tokens, so bits per byte never counts them."""
        lengths = np.zeros(self.vocab_size, dtype=np.int32)
        for piece, rank in self.ranks.items():
            lengths[rank] = len(piece)
        return lengths


def bytes_per_token(encode: typing.Callable[[str], list[int]], texts: Sequence[str]) -> float:
    """Compression of a tokenizer on some text: UTF-8 bytes over tokens (higher is better)."""
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    total_tokens = sum(len(encode(t)) for t in texts)
    return total_bytes / max(total_tokens, 1)


# ---------------------------------------------------------------------------------------------
# 4. Shards (written by 02_sharding; read by 03-06)
# ---------------------------------------------------------------------------------------------
# modded-nanogpt's .bin layout: a header of 256 int32 (magic, version, item count, then ours: the vocabulary size
# the tokens were checked against and the record width) followed by the items. Version 1 is uint16 tokens exactly
# as modded writes them, so hosted shard sets load unchanged; the other versions hold uint32 tokens for large
# vocabularies and the side files that sit beside a token shard (per-token loss masks, per-example int32 records).

SHARD_MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
SHARD_VERSIONS = {1: ("tokens", np.uint16), 2: ("tokens", np.uint32), 3: ("mask", np.uint8), 4: ("records", np.int32)}


class ShardError(ValueError):
    """A shard file that is truncated, foreign or holds ids outside the vocabulary."""


def shard_version(kind: str, vocab_size: int = 0) -> int:
    if kind == "tokens":
        return 1 if vocab_size <= 2**16 else 2
    return {"mask": 3, "records": 4}[kind]


def write_shard(path: Path, items: np.ndarray, kind: str = "tokens", vocab_size: int = 0) -> Path:
    """Write one shard atomically (a temporary file renamed into place, so a crash never leaves half a shard).
    `records` are 2-D int32 arrays; their width goes in the header."""
    path = Path(path)
    version = shard_version(kind, vocab_size)
    dtype = SHARD_VERSIONS[version][1]
    items = np.asarray(items)
    if kind == "tokens" and items.size and (items.min() < 0 or (vocab_size and items.max() >= vocab_size)):
        raise ShardError(f"{path}: token ids must lie in [0, {vocab_size})")
    width = items.shape[1] if kind == "records" else 1
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:5] = (SHARD_MAGIC, version, items.shape[0], vocab_size, width)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(items.astype(dtype, copy=False).tobytes())
    os.replace(tmp, path)
    return path


def read_shard(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard after checking its header and size; with `vocab_size`, also check every token id."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes is less than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ShardError(f"{path}: not a shard (magic number {header[0]}, expected {SHARD_MAGIC})")
    if header[1] not in SHARD_VERSIONS:
        raise ShardError(f"{path}: unknown shard version {header[1]} (known: {sorted(SHARD_VERSIONS)})")
    kind, dtype = SHARD_VERSIONS[int(header[1])]
    width = max(int(header[4]), 1)
    expected = HEADER_BYTES + int(header[2]) * width * np.dtype(dtype).itemsize
    if size != expected:
        raise ShardError(f"{path}: truncated or padded: header promises {expected} bytes, file has {size}")
    shape = (int(header[2]), width) if kind == "records" else (int(header[2]),)
    items = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=shape)
    if vocab_size is not None and kind == "tokens" and items.size and int(items.max()) >= vocab_size:
        raise ShardError(f"{path}: token id {int(items.max())} is beyond the vocabulary of {vocab_size}: "
                         f"these shards were made with another tokenizer")
    return items


def list_shards(directory: Path, split: str) -> list[Path]:
    """The token shards of one split, in order: files named like `*{split}_*.bin` (ours: `train_000000.bin`;
    modded's: `fineweb_train_000001.bin`), side files (`.mask.bin`, `.records.bin`) excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"{directory}: shard directory not found (run notebooks/02_sharding first)")
    paths = sorted(p for p in directory.glob(f"*{split}_*.bin") if p.name.count(".") == 1)
    if not paths:
        raise ShardError(f"{directory}: no '{split}' shards (*{split}_*.bin) in this directory")
    return paths


def side_file(token_shard: Path, kind: str) -> Path:
    """The parallel file holding `kind` (mask or records) for a token shard: train_000000.bin -> train_000000.mask.bin."""
    token_shard = Path(token_shard)
    return token_shard.with_name(f"{token_shard.stem}.{kind}.bin")


class ShardWriter:
    """Accumulates documents (lists of token ids) and writes `prefix_000000.bin`, `prefix_000001.bin`, ... of about
    `shard_tokens` tokens each. A document never straddles two shards, so every shard starts with BOS."""

    def __init__(self, directory: Path, prefix: str, shard_tokens: int, vocab_size: int):
        self.directory, self.prefix = Path(directory), prefix
        self.shard_tokens, self.vocab_size = shard_tokens, vocab_size
        self.directory.mkdir(parents=True, exist_ok=True)
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.written: list[tuple[Path, int, int]] = []  # (path, tokens, documents)

    def add(self, doc: Sequence[int]) -> None:
        if self.pending and self.pending_tokens + len(doc) > self.shard_tokens:
            self.flush()
        self.pending.append(np.asarray(doc, dtype=np.uint32))
        self.pending_tokens += len(doc)

    def flush(self) -> None:
        if not self.pending:
            return
        path = self.directory / f"{self.prefix}_{len(self.written):06d}.bin"
        write_shard(path, np.concatenate(self.pending), "tokens", self.vocab_size)
        self.written.append((path, self.pending_tokens, len(self.pending)))
        self.pending, self.pending_tokens = [], 0


_worker_tokenizer: Tokenizer | None = None


def _load_worker_tokenizer(directory: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer.load(Path(directory))


def _encode_with_bos(texts: list[str]) -> list[np.ndarray]:
    assert _worker_tokenizer is not None
    return [np.asarray(ids, dtype=np.uint32) for ids in _worker_tokenizer.encode_batch(texts, True, num_threads=1)]


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def tokenize_parallel(tokenizer_dir: Path, docs: Iterable[str], workers: int, batch_docs: int = 256
                      ) -> Iterator[np.ndarray]:
    """Token ids of each document, BOS first, in input order, encoded by `workers` processes (each loads the
    tokenizer once). With workers <= 1 it encodes in this process, which is faster for small inputs."""
    if workers <= 1:
        _load_worker_tokenizer(str(tokenizer_dir))
        for batch in batched(docs, batch_docs):
            yield from _encode_with_bos(batch)
        return
    import multiprocessing

    # fork: a spawned worker would re-run the calling script, which is a notebook twin with no __main__ guard
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, _load_worker_tokenizer, (str(tokenizer_dir),)) as pool:
        for encoded in pool.imap(_encode_with_bos, batched(docs, batch_docs), chunksize=1):
            yield from encoded
