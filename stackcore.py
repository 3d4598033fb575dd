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
 12. CORE evaluation .................. 02_sharding, 04_core_eval

The notebooks keep the training loops in view; this file holds the reusable and performance-critical parts.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import math
import os
import sys
import time
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:
    flex_attention = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

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
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_compute_dtype(device: str) -> torch.dtype:
    """bf16 where the GPU has it (Ampere and newer); fp32 elsewhere (the CPU, and a T4, whose fp16 would need loss
    scaling that the training loops do not do yet)."""
    if device.startswith("cuda") and torch.cuda.get_device_capability()[0] >= 8:
        return torch.bfloat16
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
    path.parent.mkdir(parents=True, exist_ok=True)
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


# ---------------------------------------------------------------------------------------------
# 5. Triton kernels (used by 03_pretrain, through the Muon optimizer)
# ---------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _symmetric_matmul_kernel(
        x_ptr, y_ptr, out_ptr, M, K: tl.constexpr,
        stride_xb, stride_xm, stride_xk,
        stride_yb, stride_ym, stride_yn,
        stride_ob, stride_om, stride_on,
        alpha, beta,
        HAS_ADDEND: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # K is constexpr: the triton 3.6 interpreter cannot loop over range(0, K, BLOCK_K) with a runtime K,
        # and Muon sees only a handful of distinct matrix shapes, so the extra specialisation is cheap.
        # One program per output tile (tile_row, tile_col) of one batch entry. Only tiles on or above
        # the diagonal do work; an off-diagonal tile is stored twice, the second time with the row and
        # column strides swapped, which writes its transpose into the mirrored tile.
        tile_row = tl.program_id(0)
        tile_col = tl.program_id(1)
        batch = tl.program_id(2)
        if tile_col >= tile_row:
            rows = tile_row * BLOCK_M + tl.arange(0, BLOCK_M)
            cols = tile_col * BLOCK_M + tl.arange(0, BLOCK_M)
            ks = tl.arange(0, BLOCK_K)
            x_batch = x_ptr + batch * stride_xb
            acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_ok = (k0 + ks)[None, :] < K
                a = tl.load(x_batch + rows[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                            mask=(rows[:, None] < M) & k_ok, other=0.0)
                b = tl.load(x_batch + cols[:, None] * stride_xm + (k0 + ks)[None, :] * stride_xk,
                            mask=(cols[:, None] < M) & k_ok, other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, tl.trans(b), acc)
            acc = acc * alpha
            in_bounds = (rows[:, None] < M) & (cols[None, :] < M)
            if HAS_ADDEND:
                y = tl.load(y_ptr + batch * stride_yb + rows[:, None] * stride_ym + cols[None, :] * stride_yn,
                            mask=in_bounds, other=0.0)
                acc += beta * y.to(tl.float32)
            result = acc.to(out_ptr.dtype.element_ty)
            out_batch = out_ptr + batch * stride_ob
            tl.store(out_batch + rows[:, None] * stride_om + cols[None, :] * stride_on, result, mask=in_bounds)
            if tile_col > tile_row:
                tl.store(out_batch + rows[:, None] * stride_on + cols[None, :] * stride_om, result, mask=in_bounds)


def symmetric_matmul_reference(x: Tensor, alpha: float = 1.0, addend: Tensor | None = None,
                               beta: float = 0.0) -> Tensor:
    """alpha * x @ x.mT (+ beta * addend) in plain PyTorch; x is (..., M, K)."""
    out = alpha * (x @ x.mT)
    return out if addend is None else out + beta * addend


def _triton_usable(x: Tensor) -> bool:
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def symmetric_matmul(x: Tensor, alpha: float = 1.0, addend: Tensor | None = None, beta: float = 0.0,
                     block_m: int = 128, block_k: int = 64) -> Tensor:
    """alpha * x @ x.mT (+ beta * addend) for x of shape (..., M, K); `addend` must be symmetric (..., M, M).

    The Triton kernel computes only the tiles on and above the diagonal (about half the FLOPs of a
    plain matmul) and mirrors them. It runs on CUDA, or on CPU under TRITON_INTERPRET=1 (set before
    triton is imported); everywhere else the PyTorch reference is used. Accumulates in fp32 (fp32
    inputs on CUDA go through tl.dot's default TF32 precision); the result has x's dtype.
    """
    if not _triton_usable(x):
        return symmetric_matmul_reference(x, alpha, addend, beta)
    batch_shape, (M, K) = x.shape[:-2], x.shape[-2:]
    x3 = x.reshape(-1, M, K)
    out = torch.empty(x3.size(0), M, M, dtype=x.dtype, device=x.device)
    y3 = out if addend is None else addend.reshape(-1, M, M)  # `out` is only a placeholder pointer
    grid = (triton.cdiv(M, block_m), triton.cdiv(M, block_m), x3.size(0))
    _symmetric_matmul_kernel[grid](
        x3, y3, out, M, K, *x3.stride(), *y3.stride(), *out.stride(), float(alpha), float(beta),
        HAS_ADDEND=addend is not None, BLOCK_M=block_m, BLOCK_K=block_k,
        # The CPU interpreter multiplies the raw bits of bf16 tl.dot operands (triton-lang/triton#11584):
        # feed it fp32 tiles there (exact, as the accumulator is fp32 anyway); on CUDA keep tensor cores.
        UPCAST=not x.is_cuda,
        num_warps=8, num_stages=3,  # best of a small sweep on an H100 for 12 x (768 x 3072) bf16
    )
    return out.reshape(*batch_shape, M, M)


# ---------------------------------------------------------------------------------------------
# 6. Attention backends (used by notebooks 03-07, through the model)
# ---------------------------------------------------------------------------------------------
# All backends take packed documents: q, k, v of shape (T, H, D) with the documents concatenated,
# cu_seqlens (B+1,) int32 with the document boundaries (0, ..., T), and return (T, H, D). Attention
# is causal and never crosses a document boundary; `window` (None = unlimited) limits a query at
# position p to the keys p-window+1 .. p of its own document, i.e. at most `window` keys.

ATTENTION_BACKENDS = ("flash", "varlen", "flex", "sdpa")  # preference order for "auto"


def document_ids(cu_seqlens: Tensor, total_len: int) -> Tensor:
    """(T,) int64: index of the document each packed token belongs to."""
    tokens = torch.arange(total_len, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.long(), tokens, right=True) - 1


def positions_in_documents(cu_seqlens: Tensor, total_len: int) -> Tensor:
    """(T,) int64: position of each packed token inside its own document (restarts at 0)."""
    tokens = torch.arange(total_len, device=cu_seqlens.device)
    return tokens - cu_seqlens.long()[document_ids(cu_seqlens, total_len)]


def _flash_window(window: int | None) -> tuple[int, int]:
    # flash-attn / varlen_attn convention: (left, right) = how many keys before / after the query
    # position are visible, -1 = unlimited. Our `window` counts the query itself, hence window - 1.
    return (-1, 0) if window is None else (window - 1, 0)


def _sdpa_attention(q, k, v, cu_seqlens, max_seqlen, window):
    """Reference backend: one F.scaled_dot_product_attention call per document."""
    outputs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        length = end - start
        if window is None or window >= length:
            out = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
        else:
            offset = torch.arange(length, device=q.device)
            offset = offset[:, None] - offset[None, :]
            out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=(offset >= 0) & (offset < window))
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _document_mask_mod(doc_ids: Tensor, window: int | None):
    """FlexAttention mask_mod: same document, causal, and inside the sliding window."""
    def mask_mod(b, h, q_idx, kv_idx):
        keep = (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        return keep
    return mask_mod


@lru_cache(maxsize=8)
def _flex_block_mask(bounds: tuple[int, ...], window: int | None, device: torch.device):
    """Block mask for one packing; cached so that all layers sharing a window build it once per step."""
    total = bounds[-1]
    mask_mod = _document_mask_mod(document_ids(torch.tensor(bounds, device=device), total), window)
    kwargs = {}
    if device.type == "cuda" and "_compile" in inspect.signature(create_block_mask).parameters:
        kwargs["_compile"] = True  # avoids materialising the dense T x T mask on the GPU
    return create_block_mask(mask_mod, None, None, total, total, device=device, **kwargs)


@lru_cache(maxsize=1)
def _compiled_flex_attention():
    return torch.compile(flex_attention, dynamic=False)


def _flex_attention(q, k, v, cu_seqlens, max_seqlen, window, compiled=None):
    if q.device.type == "cpu":
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
            # FlexAttention has no CPU backward (torch raises NotImplementedError). Evaluate the same
            # mask_mod densely and let SDPA differentiate it; only CPU training takes this path.
            total = q.size(0)
            positions = torch.arange(total, device=q.device)
            mask = _document_mask_mod(document_ids(cu_seqlens, total), window)(0, 0, positions[:, None], positions)
            out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                 attn_mask=mask)
            return out.transpose(0, 1)
        q, k, v = q.detach(), k.detach(), v.detach()  # torch rejects requires_grad CPU inputs even under no_grad
    block_mask = _flex_block_mask(tuple(cu_seqlens.tolist()), window, q.device)
    attend = _compiled_flex_attention() if (q.is_cuda if compiled is None else compiled) else flex_attention
    out = attend(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask)
    return out.squeeze(0).transpose(0, 1)


def _varlen_attention(q, k, v, cu_seqlens, max_seqlen, window):
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=_flash_window(window))


@lru_cache(maxsize=1)
def _flash_varlen_function():
    """flash_attn_varlen_func of FA3 (flash_attn_interface), FA4 (flash_attn.cute) or FA2, whichever imports."""
    for module_name in ("flash_attn_interface", "flash_attn.cute", "flash_attn"):
        try:
            return importlib.import_module(module_name).flash_attn_varlen_func
        except Exception:  # ImportError, or a broken CUDA / CUTLASS install raising anything else
            continue
    return None


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, window):
    # FA2, FA3 and FA4 share the leading positional arguments and the causal / window_size keywords;
    # FA4 (and some FA3 builds) return (out, lse).
    out = _flash_varlen_function()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                   causal=True, window_size=_flash_window(window))
    return out[0] if isinstance(out, tuple) else out


_ATTENTION_FUNCTIONS = {
    "flash": _flash_attention,
    "varlen": _varlen_attention,
    "flex": _flex_attention,
    "sdpa": _sdpa_attention,
}


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              window: int | None = None, backend: str = "sdpa") -> Tensor:
    """Causal, document-masked (optionally sliding-window) attention over packed (T, H, D) tensors."""
    if backend not in _ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attention backend {backend!r}; valid names: {list(ATTENTION_BACKENDS)}")
    return _ATTENTION_FUNCTIONS[backend](q, k, v, cu_seqlens, max_seqlen, window)


def _backend_importable(name: str, device: torch.device) -> bool:
    if name == "flash":
        return device.type == "cuda" and _flash_varlen_function() is not None
    if name == "varlen":
        # torch 2.9/2.10 shipped varlen_attn without window_size (only is_causal): unusable for sliding windows
        return (device.type == "cuda" and varlen_attn is not None
                and "window_size" in inspect.signature(varlen_attn).parameters)
    if name == "flex":
        return flex_attention is not None
    return True


@lru_cache(maxsize=None)
def _backend_works(name: str, device: torch.device) -> bool:
    """Import check plus a tiny forward against the sdpa reference (catches window-convention mistakes).

    flex is checked uncompiled; its torch.compile'd CUDA path is first exercised by the first real call.
    """
    if not _backend_importable(name, device):
        return False
    if name == "sdpa":
        return True
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = torch.randn(3, 40, 2, 64, device=device, dtype=dtype, generator=generator)
    cu_seqlens = torch.tensor([0, 1, 13, 40], device=device, dtype=torch.int32)
    try:
        for window in (None, 5):
            out = (_flex_attention(q, k, v, cu_seqlens, 27, window, compiled=False) if name == "flex"
                   else _ATTENTION_FUNCTIONS[name](q, k, v, cu_seqlens, 27, window))
            expected = _sdpa_attention(q, k, v, cu_seqlens, 27, window)
            if not torch.allclose(out.float(), expected.float(), atol=3e-2, rtol=3e-2):
                return False
        return True
    except Exception:
        return False


def available_attention_backends(device: torch.device | str) -> list[str]:
    """Backends that import and give correct results on `device` in this process, in preference order."""
    device = torch.device(device)
    return [name for name in ATTENTION_BACKENDS if _backend_works(name, device)]


def pick_attention_backend(device: torch.device | str, requested: str = "auto") -> str:
    """`requested` if it works on `device`, the best working backend for "auto", else ValueError. On the CPU
    "auto" is the per-document SDPA loop: flex has no CPU backward and runs there as dense masked attention."""
    available = available_attention_backends(device)
    if requested == "auto":
        return "sdpa" if torch.device(device).type == "cpu" else available[0]
    if requested not in available:
        raise ValueError(f"attention backend {requested!r} is not available on {device}; "
                         f"valid names here: {['auto', *available]} (all backends: {list(ATTENTION_BACKENDS)})")
    return requested


# ---------------------------------------------------------------------------------------------
# 7. Model (used by notebooks 03-07)
# ---------------------------------------------------------------------------------------------

@dataclass
class GPTConfig:
    vocab_size: int = 32768
    depth: int = 12
    model_dim: int = 0  # 0 means 64 * depth (nanochat's aspect ratio)
    head_dim: int = 128
    mlp_ratio: int = 4
    max_seq_len: int = 2048  # rotary table length, and the longest document
    softcap: float = 15.0
    short_window: int = 0  # sliding window of "S" layers; 0 means max_seq_len // 2
    window_pattern: str = "SSSL"  # tiled over the layers; the last layer is always "L" (full causal)
    n_value_embeds: int = 3  # table i feeds layer i and layer depth-1-i; capped at depth // 2

    def __post_init__(self):
        if self.dim % self.head_dim:
            raise ValueError(f"model_dim {self.dim} must be divisible by head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embeddings rotate pairs)")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} must be a non-empty string of 'S' and 'L'")
        if self.n_value_embeds < 0:
            raise ValueError(f"n_value_embeds {self.n_value_embeds} must be >= 0")

    @property
    def dim(self) -> int:
        return self.model_dim or 64 * self.depth

    @property
    def n_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def value_embed_tables(self) -> int:
        """Number of value-embedding tables: n_value_embeds, capped so that each feeds two distinct layers."""
        return min(self.n_value_embeds, self.depth // 2)

    @property
    def window(self) -> int:
        """The resolved short (sliding) window."""
        return self.short_window or self.max_seq_len // 2


def norm(x: Tensor) -> Tensor:
    """RMSNorm without learned parameters."""
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(max_seq_len: int, head_dim: int, base: float = 10000.0,
                  device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim // 2), fp32."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the two halves of the head dimension of x (T, H, D) by per-token angles (T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CastedLinear(nn.Linear):
    """Bias-free linear layer: fp32 master weight, weight and input cast to `compute_dtype` for the matmul."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.compute_dtype = torch.float32

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, has_value_embed: bool):
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.c_q = CastedLinear(config.dim, config.dim)
        self.c_k = CastedLinear(config.dim, config.dim)
        self.c_v = CastedLinear(config.dim, config.dim)
        self.c_proj = CastedLinear(config.dim, config.dim)
        # v <- value_mix[0] * v + value_mix[1] * value_embed (only in layers fed by a value-embedding table)
        self.value_mix = nn.Parameter(torch.full((2,), 0.5)) if has_value_embed else None

    def forward(self, x, value_embed, cos, sin, cu_seqlens, max_seqlen, window, backend):
        T = x.size(0)
        q = self.c_q(x).view(T, self.n_heads, self.head_dim)
        k = self.c_k(x).view(T, self.n_heads, self.head_dim)
        v = self.c_v(x).view(T, self.n_heads, self.head_dim)
        if value_embed is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embed.view_as(v)
        q, k = apply_rotary(norm(q), cos, sin), apply_rotary(norm(k), cos, sin)  # QK-norm, then rotary
        y = attention(q, k, v, cu_seqlens, max_seqlen, window, backend)
        return self.c_proj(y.reshape(T, -1))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = CastedLinear(config.dim, config.mlp_ratio * config.dim)
        self.c_proj = CastedLinear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, has_value_embed: bool):
        super().__init__()
        self.attn = CausalSelfAttention(config, has_value_embed)
        self.mlp = MLP(config)

    def forward(self, x, value_embed, cos, sin, cu_seqlens, max_seqlen, window, backend):
        x = x + self.attn(norm(x), value_embed, cos, sin, cu_seqlens, max_seqlen, window, backend)
        return x + self.mlp(norm(x))


# Suggested learning rates (modded-nanogpt-like). Muon's lr is relative to the orthogonalised update,
# whose RMS is ~1/sqrt(max dim) before Muon's shape scaling. The Adam lrs for embeddings and head are
# for model_dim 768 and get multiplied by (model_dim / 768) ** -0.5 (nanochat's rule: wider models
# take smaller Adam steps); scalars are dimensionless, so they are not scaled.
DEFAULT_LRS = {"matrices": 0.05, "embedding": 0.3, "value_embeds": 0.3, "head": 0.008, "scalars": 0.04}


class GPT(nn.Module):
    """Decoder-only transformer over packed documents (see the Attention backends section)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = torch.float32
        self.wte = nn.Embedding(config.vocab_size, config.dim)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, config.dim)
                                          for _ in range(config.value_embed_tables))
        self.blocks = nn.ModuleList(Block(config, self.value_embed_index(i) is not None)
                                    for i in range(config.depth))
        self.lm_head = CastedLinear(config.dim, config.vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(config.depth))   # block input = resid * x + x0 * x0
        self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        self.skip_weights = nn.Parameter(torch.ones(config.depth // 2))  # U-net: layer i -> layer depth-1-i
        cos, sin = rotary_tables(config.max_seq_len, config.head_dim)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings ~ N(0, 1); q, k, v, fc ~ U(-a, a) with a = sqrt(3 / fan_in), i.e. std 1/sqrt(fan_in);
        attention output, MLP output and lm_head are zero, so the initial loss is exactly ln(vocab_size)."""
        for embedding in (self.wte, *self.value_embeds):
            nn.init.normal_(embedding.weight, std=1.0)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / linear.in_features)
                nn.init.uniform_(linear.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.value_mix is not None:
                block.attn.value_mix.fill_(0.5)
        nn.init.zeros_(self.lm_head.weight)
        self.resid_lambdas.fill_(1.0)
        self.x0_lambdas.fill_(0.0)
        self.skip_weights.fill_(1.0)
        cos, sin = rotary_tables(self.config.max_seq_len, self.config.head_dim, device=self.rotary_cos.device)
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Matmul / activation dtype: bf16 on GPUs that have it, fp16 on e.g. a T4, fp32 on CPU."""
        self.compute_dtype = dtype
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.compute_dtype = dtype

    def value_embed_index(self, layer: int) -> int | None:
        """Which value-embedding table feeds `layer` (U-net symmetric), or None."""
        mirrored = min(layer, self.config.depth - 1 - layer)
        return mirrored if mirrored < self.config.value_embed_tables else None

    def layer_windows(self, short_window: int | None = None) -> list[int | None]:
        """Per-layer attention window: "S" layers get `short_window` (default config.window), "L" layers
        and the last layer get None (full causal). Pass a growing `short_window` to follow a schedule."""
        short = short_window or self.config.window
        pattern = self.config.window_pattern
        windows = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.config.depth)]
        windows[-1] = None
        return windows

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor, max_seqlen: int, target_ids: Tensor | None = None,
                *, windows: list[int | None] | None = None, backend: str = "sdpa",
                loss_reduction: str = "mean") -> Tensor:
        """input_ids (T,) packed documents with boundaries cu_seqlens (B+1,) int32.

        Returns fp32 logits (T, vocab) without targets; with targets, the cross-entropy over targets != -1
        reduced by `loss_reduction` ("mean", "sum", or "none" for per-token losses, 0 at ignored tokens).
        `windows` defaults to layer_windows().
        """
        config = self.config
        if max_seqlen > config.max_seq_len:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds config.max_seq_len {config.max_seq_len}")
        windows = self.layer_windows() if windows is None else windows
        if len(windows) != config.depth:
            raise ValueError(f"need one window per layer ({config.depth}), got {len(windows)}")
        positions = positions_in_documents(cu_seqlens, input_ids.size(0))
        cos, sin = self.rotary_cos[positions], self.rotary_sin[positions]
        x0 = norm(self.wte(input_ids).to(self.compute_dtype))
        value_embeds = [table(input_ids).to(self.compute_dtype) for table in self.value_embeds]
        n_skip = config.depth // 2
        x, skips = x0, []
        for i, block in enumerate(self.blocks):
            if i >= config.depth - n_skip:
                mirror = config.depth - 1 - i
                x = x + self.skip_weights[mirror] * skips[mirror]
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            table = self.value_embed_index(i)
            value_embed = None if table is None else value_embeds[table]
            x = block(x, value_embed, cos, sin, cu_seqlens, max_seqlen, windows[i], backend)
            if i < n_skip:
                skips.append(x)
        logits = self.lm_head(norm(x)).float()
        logits = config.softcap * torch.tanh(logits / config.softcap)
        if target_ids is None:
            return logits
        return F.cross_entropy(logits, target_ids, ignore_index=-1, reduction=loss_reduction)

    def parameter_kinds(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by kind: matrices (2D weights inside blocks), embedding, value_embeds, head, scalars."""
        kinds = {
            "matrices": [p for p in self.blocks.parameters() if p.ndim == 2],
            "embedding": [self.wte.weight],
            "value_embeds": [table.weight for table in self.value_embeds],
            "head": [self.lm_head.weight],
            "scalars": [p for p in self.parameters() if p.ndim < 2],
        }
        assert sum(map(len, kinds.values())) == len(list(self.parameters())), "unclassified parameter"
        return kinds

    def num_params(self) -> dict[str, int]:
        """Parameter counts per kind (see parameter_kinds) plus "total"."""
        counts = {kind: sum(p.numel() for p in params) for kind, params in self.parameter_kinds().items()}
        counts["total"] = sum(counts.values())
        return counts

    def param_groups(self) -> list[dict]:
        """Optimizer groups with suggested lrs (DEFAULT_LRS): matrices -> Muon, everything else -> Adam."""
        adam_scale = (self.config.dim / 768) ** -0.5
        groups = []
        for kind, params in self.parameter_kinds().items():
            lr = DEFAULT_LRS[kind] * (adam_scale if kind in ("embedding", "value_embeds", "head") else 1.0)
            groups.append(dict(kind=kind, optimizer="muon" if kind == "matrices" else "adam", lr=lr, params=params))
        return groups

    def flops_per_token(self, seq_len: int, windows: list[int | None] | None = None) -> float:
        """Training FLOPs per token (forward + backward).

        Convention: 6 FLOPs per matmul parameter (matrices + lm_head; embedding lookups are free), plus
        attention: QK^T and AV cost 4 * n_heads * head_dim FLOPs per (query, key) pair forward, x3 for
        forward + backward, times the mean number of keys a query sees: seq_len / 2 for causal layers
        (12 * n_heads * head_dim * seq_len / 2 per layer) and w - w^2 / (2 seq_len) for a window w < seq_len.
        Norms, softmax and other elementwise work are not counted. `windows` defaults to layer_windows().
        """
        counts = self.num_params()
        windows = self.layer_windows() if windows is None else windows
        attended = [seq_len / 2 if w is None or w >= seq_len else w - w * w / (2 * seq_len) for w in windows]
        return 6 * (counts["matrices"] + counts["head"]) + 12 * self.config.n_heads * self.config.head_dim * sum(attended)

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes per token (keys and values of every layer; value embeds need no cache)."""
        return 2 * self.config.depth * self.config.dim * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# 8. Optimizer and schedules (used by 03_pretrain, 05_sft, 06_rl)
# ---------------------------------------------------------------------------------------------

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, same for every step


def _minimax_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """Coefficients (a, b, c) of the odd quintic a x + b x^3 + c x^5 closest to 1 in max-norm on [lo, hi].

    Remez exchange (Polar Express, Amsel et al. 2025, App. D): the optimum p - 1 equioscillates with
    values -E, +E, -E, +E at lo, the two interior extrema of p, and hi.
    """
    if lo / hi > 1 - 1e-4:  # (nearly) collapsed interval, where the solve is ill-conditioned: use the
        # limit, the quintic with p(hi) = 1 and p' = p'' = 0 there; its max error is O((1 - lo/hi)^3)
        return 15 / 8 / hi, -10 / 8 / hi**3, 3 / 8 / hi**5
    nodes = [lo, (3 * lo + hi) / 4, (lo + 3 * hi) / 4, hi]
    for _ in range(100):
        system = torch.tensor([[x, x**3, x**5, sign] for x, sign in zip(nodes, (1, -1, 1, -1))], dtype=torch.float64)
        a, b, c, _ = torch.linalg.solve(system, torch.ones(4, dtype=torch.float64)).tolist()
        root = math.sqrt(9 * b * b - 20 * a * c)  # p'(x) = a + 3b x^2 + 5c x^4 = 0
        extrema = sorted(math.sqrt((-3 * b + s * root) / (10 * c)) for s in (-1, 1))
        converged = max(abs(extrema[0] - nodes[1]), abs(extrema[1] - nodes[2])) < 1e-15
        nodes = [lo, *extrema, hi]
        if converged:
            break
    return a, b, c


@lru_cache(maxsize=None)
def polar_express_coefficients(steps: int = 5, lower: float = 1e-3, cushion: float = 0.02,
                               safety: float = 1.01) -> tuple[tuple[float, float, float], ...]:
    """Per-step quintic coefficients of Polar Express (Amsel et al. 2025), derived here from the paper's recipe.

    Singular values start in [lower, 1]; each step uses the minimax quintic for the current interval
    [lo, hi] (lo floored at cushion * hi to keep the polynomial tame), re-centred so that p(lo) and
    p(hi) straddle 1, and, except in the last step, evaluated at x / safety: a 1% margin so that bf16
    round-off cannot push singular values past the interval where the next polynomial is accurate.
    """
    lo, hi = lower, 1.0
    coefficients = []
    for step in range(steps):
        a, b, c = _minimax_odd_quintic(max(lo, cushion * hi), hi)
        scale = 2 / (a * (lo + hi) + b * (lo**3 + hi**3) + c * (lo**5 + hi**5))
        a, b, c = a * scale, b * scale, c * scale
        if step < steps - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        coefficients.append((a, b, c))
        lo = a * lo + b * lo**3 + c * lo**5
        hi = 2 - lo
    return tuple(coefficients)


def orthogonalize(g: Tensor, method: str = "polar_express", steps: int = 5) -> Tensor:
    """Approximate the polar factor U V^T of g (..., rows, cols) with an odd-polynomial iteration.

    "polar_express" (default) uses per-step minimax coefficients; "newton_schulz" the fixed quintic,
    which leaves singular values roughly in [0.7, 1.2]. Runs in bf16 on CUDA, fp32 elsewhere, and
    returns that dtype. Tall matrices are transposed so that the Gram matrix X X^T is the small one.
    """
    if method == "polar_express":
        coefficients = polar_express_coefficients(steps)
    elif method == "newton_schulz":
        coefficients = (NEWTON_SCHULZ_COEFFICIENTS,) * steps
    else:
        raise ValueError(f"unknown orthogonalization method {method!r}; use 'polar_express' or 'newton_schulz'")
    x = g.to(torch.bfloat16 if g.is_cuda else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT.contiguous()
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    # Frobenius norm >= spectral norm, so singular values land in (0, 1/1.01]; the 1.01 is the paper's margin.
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * 1.01 + 1e-7)
    for a, b, c in coefficients:
        gram = symmetric_matmul(x)
        poly = symmetric_matmul(gram, alpha=c, addend=gram, beta=b)  # b A + c A^2 for symmetric A
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b A + c A^2) X
    x = x.reshape(*batch_shape, *x.shape[-2:])
    return x.mT if transposed else x


def _world() -> tuple[int, int]:
    """(world_size, rank); (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _reduce_scatter_mean(stacked: Tensor, world_size: int, rank: int) -> Tensor:
    """Average `stacked` (world_size * n, ...) over ranks and return this rank's n entries."""
    if world_size == 1:
        return stacked
    n = stacked.size(0) // world_size
    if dist.get_backend() == "gloo":
        # gloo lacks reduce_scatter_tensor on older torch (e.g. 2.9): all-reduce everything, keep our slice.
        dist.all_reduce(stacked)
        own = stacked[rank * n:(rank + 1) * n]
    else:
        own = stacked.new_empty(n, *stacked.shape[1:])
        reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        reduce_scatter(own, stacked)
    return own.div_(world_size)


def _all_gather_stacked(own: Tensor, world_size: int) -> Tensor:
    """Concatenate every rank's `own` (n, ...) along dim 0, in rank order."""
    if world_size == 1:
        return own
    out = own.new_empty(world_size * own.size(0), *own.shape[1:])
    if dist.get_backend() == "gloo":
        dist.all_gather(list(out.chunk(world_size)), own)
    else:
        all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        all_gather(out, own)
    return out


def all_reduce_gradients(params: list[Tensor]) -> None:
    """Average .grad of `params` over all ranks (no-op when not distributed)."""
    world_size, _ = _world()
    grads = [p.grad for p in params if p.grad is not None]
    if world_size == 1 or not grads:
        return
    for work in [dist.all_reduce(g, async_op=True) for g in grads]:
        work.wait()
    torch._foreach_div_(grads, world_size)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): Nesterov momentum on 2D matrices, update replaced by its polar factor.

    Parameters are grouped by shape so each group is orthogonalised in one batched call. The update is
    scaled by max(1, rows / cols) ** 0.5 (Keller Jordan's original choice), and weight decay is decoupled
    (p <- p * (1 - lr * weight_decay)). When torch.distributed is initialised with several ranks, step()
    averages the gradients itself with a reduce-scatter: each rank keeps momentum for and orthogonalises
    only its share of every shape group, then the updates are all-gathered, so every rank applies the
    same update (call it with the raw local gradients; step_optimizers does this).
    """

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, method: str = "polar_express", steps: int = 5):
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only optimises 2D matrices; give other parameters to AdamW")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == shape]} for shape in shapes]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        method=method, steps=steps)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        world_size, rank = _world()
        for group in self.param_groups:
            params = group["params"]
            per_rank = -(-len(params) // world_size)  # ceil: the last rank's share may be padded
            grads = torch.zeros(per_rank * world_size, *params[0].shape, device=params[0].device,
                                dtype=params[0].dtype)
            for i, p in enumerate(params):
                if p.grad is not None:
                    grads[i] = p.grad
            own_grads = _reduce_scatter_mean(grads, world_size, rank)
            own_params = params[rank * per_rank:(rank + 1) * per_rank]
            update = torch.zeros_like(own_grads)
            if own_params:
                update[:len(own_params)] = self._orthogonal_update(group, own_params, own_grads[:len(own_params)])
            updates = _all_gather_stacked(update, world_size)[:len(params)].unbind(0)
            rows, cols = params[0].shape
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            torch._foreach_add_(params, updates, alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    def _orthogonal_update(self, group: dict, params: list[Tensor], grads: Tensor) -> Tensor:
        buffers = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buffers.append(state["momentum_buffer"])
        momentum = group["momentum"]
        torch._foreach_lerp_(buffers, list(grads.unbind(0)), 1 - momentum)  # EMA of gradients
        stacked = torch.stack(buffers)
        direction = grads.lerp(stacked, momentum) if group["nesterov"] else stacked
        return orthogonalize(direction, group["method"], group["steps"]).to(grads.dtype)


def build_optimizers(model: GPT, muon_lr: float | None = None, adam_lrs: dict[str, float] | None = None,
                     weight_decay: float = 0.0, method: str = "polar_express") -> list[torch.optim.Optimizer]:
    """[AdamW(embedding, value_embeds, head, scalars), Muon(hidden matrices)] with model.param_groups() lrs.

    `adam_lrs` overrides per kind (e.g. {"head": 0.004}); `weight_decay` is Muon's (Adam groups use none).
    Every group records "initial_lr" so that apply_schedule() can scale it.
    """
    groups = model.param_groups()
    adam_lrs = adam_lrs or {}
    adam_groups = [g for g in groups if g["optimizer"] == "adam"]
    unknown = set(adam_lrs) - {g["kind"] for g in adam_groups}
    if unknown:
        raise ValueError(f"adam_lrs has unknown kinds {sorted(unknown)}; valid: {[g['kind'] for g in adam_groups]}")
    adam_param_groups = [dict(kind=g["kind"], params=g["params"], lr=adam_lrs.get(g["kind"], g["lr"]))
                         for g in adam_groups if g["params"]]
    on_cuda = all(p.is_cuda for g in adam_param_groups for p in g["params"])
    adam = torch.optim.AdamW(adam_param_groups, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0,
                             fused=True if on_cuda else None)
    matrices = next(g for g in groups if g["optimizer"] == "muon")
    muon = Muon(matrices["params"], lr=matrices["lr"] if muon_lr is None else muon_lr,
                weight_decay=weight_decay, method=method)
    for optimizer in (adam, muon):
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
    return [adam, muon]


def step_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    """Average gradients over ranks (if distributed), step every optimizer and clear the gradients.

    Muon averages its own gradients inside step() (reduce-scatter); the others are all-reduced here.
    """
    for optimizer in optimizers:
        if not isinstance(optimizer, Muon):
            all_reduce_gradients([p for group in optimizer.param_groups for p in group["params"]])
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def apply_schedule(optimizers: list[torch.optim.Optimizer], lr_mult: float, momentum: float | None = None) -> None:
    """Set every group's lr to initial_lr * lr_mult and, if given, Muon's momentum."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if momentum is not None and isinstance(optimizer, Muon):
                group["momentum"] = momentum


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, cooldown_frac: float = 0.4,
                  final_multiplier: float = 0.0) -> float:
    """Linear warmup to 1 over warmup_steps, flat, then linear decay to final_multiplier over the last
    cooldown_frac of training (reached at step == total_steps)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown_start = total_steps * (1 - cooldown_frac)
    if step < cooldown_start:
        return 1.0
    progress = min(1.0, (step - cooldown_start) / max(total_steps - cooldown_start, 1))
    return 1.0 - (1.0 - final_multiplier) * progress


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum ramped linearly from `start` to `end` over the first warmup_steps."""
    return start + (end - start) * min(1.0, step / warmup_steps) if warmup_steps > 0 else end


def short_window_schedule(step: int, total_steps: int, final_window: int, start_window: int = 128,
                          granularity: int = 128) -> int:
    """Sliding window that grows linearly from start_window to final_window over training (modded-nanogpt
    grows its short windows too), rounded down to `granularity` so that few distinct values (and
    recompilations / block masks) occur. Feed it to GPT.layer_windows()."""
    window = start_window + (final_window - start_window) * min(1.0, step / max(total_steps, 1))
    return max(start_window, min(final_window, int(window) // granularity * granularity))


# ---------------------------------------------------------------------------------------------
# 9. Pretraining loader (used by 03_pretrain)
# ---------------------------------------------------------------------------------------------
# Each step, every rank takes `tokens` consecutive tokens that start at a BOS, so its batch is whole documents
# (the last one cut to fit) packed into one row with cumulative lengths for varlen attention. Documents longer
# than `max_doc_len` are cut into pieces that attend separately. All ranks walk the same stream in lockstep and
# each takes its own slice, so no communication is needed; the position is a small dict saved in checkpoints.

@dataclass
class Batch:
    inputs: Tensor  # (T,) token ids
    targets: Tensor  # (T,) next-token ids
    cu_seqlens: Tensor  # (docs + 1,) int32 document boundaries within inputs
    max_seqlen: int


def document_boundaries(inputs: np.ndarray, bos_id: int, max_doc_len: int) -> np.ndarray:
    """cu_seqlens for a packed row: a boundary at position 0, at every BOS, and every max_doc_len inside a document."""
    starts = np.flatnonzero(inputs == bos_id)
    starts = np.union1d([0], starts)
    bounds = []
    for start, end in zip(starts, np.append(starts[1:], len(inputs))):
        bounds.extend(range(int(start), int(end), max_doc_len))
    return np.asarray([*bounds, len(inputs)], dtype=np.int32)


class PretrainLoader:
    """Endless BOS-aligned batches from token shards, `tokens` per rank per call, wrapping around at the end."""

    def __init__(self, shard_dir: Path, split: str, tokens: int, bos_id: int, vocab_size: int, max_doc_len: int,
                 rank: int = 0, world_size: int = 1, device: str = "cpu"):
        self.paths = list_shards(shard_dir, split)
        self.tokens, self.bos_id, self.vocab_size, self.max_doc_len = tokens, bos_id, vocab_size, max_doc_len
        self.rank, self.world_size, self.device = rank, world_size, device
        self.position = {"shard": 0, "offset": 0, "epoch": 0}
        self._load_shard()

    def _load_shard(self) -> None:
        self.shard = read_shard(self.paths[self.position["shard"]], self.vocab_size)
        self.bos_positions = np.flatnonzero(np.asarray(self.shard) == self.bos_id)
        if len(self.shard) <= self.tokens * self.world_size:
            raise ShardError(f"{self.paths[self.position['shard']]}: {len(self.shard)} tokens is too few for "
                             f"{self.world_size} rank(s) x {self.tokens} tokens per step: write larger shards")

    def _next_start(self, offset: int) -> int | None:
        """The first BOS at or after `offset` that leaves room for a whole batch in this shard."""
        index = np.searchsorted(self.bos_positions, offset)
        if index < len(self.bos_positions) and self.bos_positions[index] + self.tokens + 1 <= len(self.shard):
            return int(self.bos_positions[index])
        return None

    def _advance_shard(self) -> None:
        shard = self.position["shard"] + 1
        epoch = self.position["epoch"] + (shard == len(self.paths))
        self.position = {"shard": shard % len(self.paths), "offset": 0, "epoch": epoch}
        self._load_shard()

    def _take_row(self) -> np.ndarray:
        start = self._next_start(self.position["offset"])
        while start is None:
            self._advance_shard()
            start = self._next_start(0)
        self.position["offset"] = start + self.tokens
        return np.asarray(self.shard[start:start + self.tokens + 1], dtype=np.int64)

    def next_batch(self) -> Batch:
        rows = [self._take_row() for _ in range(self.world_size)]
        row = rows[self.rank]
        cu_seqlens = document_boundaries(row[:-1], self.bos_id, self.max_doc_len)
        to_device = lambda a: torch.from_numpy(a).to(self.device, non_blocking=True)
        return Batch(to_device(row[:-1]), to_device(row[1:]), to_device(cu_seqlens),
                     int(np.diff(cu_seqlens).max()))

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = dict(state)
        self._load_shard()


# ---------------------------------------------------------------------------------------------
# 10. Evaluation: bits per byte (used by 03_pretrain, 04_core_eval)
# ---------------------------------------------------------------------------------------------
# Summed cross-entropy in nats over ln(2) x the UTF-8 bytes of the predicted tokens. Special tokens have 0 bytes
# and are left out of both sums, so the figure does not depend on the vocabulary.

@torch.no_grad()
def evaluate_bpb(model: GPT, loader: PretrainLoader, steps: int, token_bytes: Tensor, backend: str) -> float:
    """Bits per byte over `steps` batches of `loader` (each rank its own batches; summed over ranks)."""
    model.eval()
    nats = torch.zeros((), device=token_bytes.device, dtype=torch.float64)
    total_bytes = torch.zeros((), device=token_bytes.device, dtype=torch.float64)
    for _ in range(steps):
        batch = loader.next_batch()
        losses = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, backend=backend,
                       loss_reduction="none")
        target_bytes = token_bytes[batch.targets]
        counted = target_bytes > 0
        nats += losses[counted].double().sum()
        total_bytes += target_bytes[counted].double().sum()
    if dist.is_initialized():
        dist.all_reduce(nats)
        dist.all_reduce(total_bytes)
    model.train()
    return float(nats / (math.log(2) * total_bytes))


# ---------------------------------------------------------------------------------------------
# 11. Checkpoints, distributed set-up and run logs (used by 03-07)
# ---------------------------------------------------------------------------------------------

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "T4": 65e12}


def peak_flops(device: str) -> float | None:
    """Dense bf16 (fp16 on a T4) tensor-core peak of the GPU from its datasheet, for MFU; None if unknown."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: str

    @property
    def master(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPU); a single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def save_checkpoint(directory: Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    loader: PretrainLoader, config: Any, dist_info: DistInfo, extra: dict | None = None) -> Path:
    """`step_NNNNNN.pt` (model, config, step; rank 0) and `step_NNNNNN.rankR.pt` (optimizer and loader state of
    each rank: distributed Muon keeps each rank's momentum share apart). Written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:06d}.pt"
    rank_path = directory / f"step_{step:06d}.rank{dist_info.rank}.pt"
    atomic_save({"optimizers": [o.state_dict() for o in optimizers], "loader": loader.state_dict()}, rank_path)
    if dist_info.master:
        atomic_save({"model": model.state_dict(), "model_config": dataclasses.asdict(model.config),
                     "config": dataclasses.asdict(config), "step": step, **(extra or {})}, path)
    if dist.is_initialized():
        dist.barrier()
    return path


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def latest_checkpoint(directory: Path) -> Path | None:
    paths = sorted(Path(directory).glob("step_??????.pt"))
    return paths[-1] if paths else None


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """The rank-0 checkpoint (model weights, configs, step)."""
    return torch.load(require_artifact(Path(path), made_by="03_pretrain"), map_location=device, weights_only=False)


def restore_training_state(path: Path, optimizers: list[torch.optim.Optimizer], loader: PretrainLoader,
                           dist_info: DistInfo) -> None:
    rank_path = Path(path).with_name(f"{Path(path).stem}.rank{dist_info.rank}.pt")
    state = torch.load(require_artifact(rank_path, made_by="03_pretrain"), map_location=dist_info.device,
                       weights_only=False)
    for optimizer, optimizer_state in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(optimizer_state)
    loader.load_state_dict(state["loader"])


def model_from_checkpoint(path: Path, device: str) -> tuple[GPT, dict[str, Any]]:
    checkpoint = load_checkpoint(path, device)
    model = GPT(GPTConfig(**checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


class RunLog:
    """Appends one JSON object per event to `metrics.jsonl` in the run folder (and to wandb when enabled)."""

    def __init__(self, run_dir: Path, enabled: bool = True, wandb_run: Any = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled, self.wandb_run = enabled, wandb_run
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, **metrics: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics)

    def read(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in open(self.path)] if self.path.exists() else []


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ---------------------------------------------------------------------------------------------
# 12. CORE evaluation (used by 02_sharding, 04_core_eval)
# ---------------------------------------------------------------------------------------------
# The 22 tasks of the DCLM paper, scored as nanochat does (data/core.py reads and renders them). 02_sharding
# tokenizes every rendered example once into shards/core/<task>.bin, a token shard holding one full sequence
# (BOS, context, continuation) per (example, choice), and <task>.records.bin, one int32 row per sequence with
# the columns of CORE_RECORD_FIELDS: token offsets of the sequence start, the continuation start and the end,
# then the example index (in the task file), the choice index and 1 on the gold choice. tasks.json lists the
# tasks with their type and random baseline. Scoring packs many sequences into one varlen forward pass: a
# multiple-choice or schema example is right when its gold choice has the lowest mean continuation loss; a
# language-modelling example when greedy decoding reproduces the continuation exactly.

CORE_RECORD_FIELDS = ("seq_start", "cont_start", "seq_end", "example", "choice", "gold")
CORE_MANIFEST = "tasks.json"


@dataclass
class CoreExample:
    """One rendered example: choice i is the text contexts[i] + continuations[i]; only the continuation is scored."""
    kind: str  # multiple_choice | schema | language_modeling
    contexts: list[str]
    continuations: list[str]
    gold: int


@dataclass
class CoreShard:
    label: str
    kind: str
    baseline: float  # random-guess accuracy in [0, 1]
    tokens: np.ndarray
    records: np.ndarray  # (sequences, len(CORE_RECORD_FIELDS)) int32


def common_prefix_length(seqs: list[list[int]]) -> int:
    length = 0
    for column in zip(*seqs):
        if any(token != column[0] for token in column):
            break
        length += 1
    return length


def continuation_starts(example: CoreExample, seqs: list[list[int]], context_lengths: list[int]) -> list[int]:
    """Where each choice's continuation begins, as nanochat finds it in token space: after the tokens all choices
    share (multiple choice), before the tokens all options share (schema), after the context alone (language
    modelling). Always at least one scored token, never the BOS."""
    if example.kind == "multiple_choice":
        starts = [common_prefix_length(seqs)] * len(seqs)
    elif example.kind == "schema":
        shared = common_prefix_length([s[::-1] for s in seqs])
        starts = [len(s) - shared for s in seqs]
    else:
        starts = context_lengths
    return [min(max(start, 1), len(s) - 1) for start, s in zip(starts, seqs)]


def tokenize_core_examples(tokenizer: Tokenizer, examples: Sequence[CoreExample]) -> list[list[tuple[list[int], int]]]:
    """Per example, per choice: (BOS + full text tokens, continuation start). Language-modelling texts are
    stripped of surrounding whitespace, so the context's trailing space joins the continuation's first token."""
    def full_texts(ex: CoreExample) -> list[str]:
        texts = [c + x for c, x in zip(ex.contexts, ex.continuations)]
        return [texts[0].strip()] if ex.kind == "language_modeling" else texts

    fulls = tokenizer.encode_batch([t for ex in examples for t in full_texts(ex)], prepend_bos=True)
    lm_contexts = [ex.contexts[0].strip() for ex in examples if ex.kind == "language_modeling"]
    context_lengths = iter(len(ids) for ids in tokenizer.encode_batch(lm_contexts, prepend_bos=True))
    result, position = [], 0
    for ex in examples:
        seqs = fulls[position:position + len(ex.contexts)]
        position += len(seqs)
        lengths = [next(context_lengths)] if ex.kind == "language_modeling" else []
        result.append(list(zip(seqs, continuation_starts(ex, seqs, lengths))))
    return result


def write_core_shard(directory: Path, label: str, examples: Sequence[tuple[int, CoreExample]],
                     tokenizer: Tokenizer) -> Path:
    """Tokenize (example index, rendered example) pairs into `label`.bin and its records side file."""
    tokenized = tokenize_core_examples(tokenizer, [ex for _, ex in examples])
    sequences, records, offset = [], [], 0
    for (index, ex), choices in zip(examples, tokenized):
        for choice, (seq, start) in enumerate(choices):
            records.append((offset, offset + start, offset + len(seq), index, choice, int(choice == ex.gold)))
            sequences.append(np.asarray(seq, dtype=np.uint32))
            offset += len(seq)
    path = Path(directory) / f"{label}.bin"
    write_shard(path, np.concatenate(sequences), "tokens", tokenizer.vocab_size)
    table = np.asarray(records, dtype=np.int32).reshape(-1, len(CORE_RECORD_FIELDS))
    write_shard(side_file(path, "records"), table, "records")
    return path


def write_core_manifest(directory: Path, tasks: list[dict[str, Any]]) -> Path:
    """tasks.json: one {label, kind, baseline, examples} per task written, in CORE order."""
    path = Path(directory) / CORE_MANIFEST
    path.write_text(json.dumps(tasks, indent=1))
    return path


def read_core_shards(directory: Path, vocab_size: int | None = None) -> list[CoreShard]:
    manifest = require_artifact(Path(directory) / CORE_MANIFEST, made_by="02_sharding")
    shards = []
    for task in json.loads(manifest.read_text()):
        path = Path(directory) / f"{task['label']}.bin"
        shards.append(CoreShard(task["label"], task["kind"], task["baseline"], read_shard(path, vocab_size),
                                read_shard(side_file(path, "records"))))
    return shards


def core_sequence(tokens: np.ndarray, record: np.ndarray, max_seq_len: int) -> tuple[np.ndarray, int]:
    """A record's tokens and continuation start, cut from the left to fit max_seq_len (as nanochat does)."""
    seq_start, cont_start, seq_end = (int(v) for v in record[:3])
    cut = max(0, seq_end - seq_start - max_seq_len)
    return np.asarray(tokens[seq_start + cut:seq_end], dtype=np.int64), max(cont_start - seq_start - cut, 1)


def _score_pack(model: GPT, pack: list[tuple[np.ndarray, int]], backend: str, device: str) -> Tensor:
    """(mean continuation loss, 1 if greedy decoding gives the continuation exactly) per sequence of one pass."""
    lengths = [len(seq) - 1 for seq, _ in pack]
    inputs = torch.from_numpy(np.concatenate([seq[:-1] for seq, _ in pack])).to(device)
    cu_seqlens = torch.tensor(np.cumsum([0, *lengths]), dtype=torch.int32, device=device)
    offsets = np.cumsum([0, *lengths[:-1]])
    # the prediction of token t of a sequence sits at input position t - 1
    positions = np.concatenate([np.arange(o + start - 1, o + len(seq) - 1) for o, (seq, start) in zip(offsets, pack)])
    targets = np.concatenate([seq[start:] for seq, start in pack])
    owners = np.concatenate([np.full(len(seq) - start, i) for i, (seq, start) in enumerate(pack)])
    logits = model(inputs, cu_seqlens, max(lengths), backend=backend)[torch.from_numpy(positions).to(device)]
    targets_t, owners_t = torch.from_numpy(targets).to(device), torch.from_numpy(owners).to(device)
    losses = F.cross_entropy(logits, targets_t, reduction="none")
    misses = (logits.argmax(-1) != targets_t).float()
    sums = torch.zeros(len(pack), 3, device=device)
    sums.index_add_(0, owners_t, torch.stack([losses, misses, torch.ones_like(losses)], 1))
    return torch.stack([sums[:, 0] / sums[:, 2], (sums[:, 1] == 0).float()], 1)


@torch.no_grad()
def score_core_records(model: GPT, tokens: np.ndarray, records: np.ndarray, backend: str, device: str,
                       pack_tokens: int = 0) -> np.ndarray:
    """(mean loss, exact) for each record. Sequences are packed into passes of up to `pack_tokens` tokens;
    pack_tokens=0 runs one sequence per pass (the reference the packed path must match)."""
    scores, pack, pack_size = [], [], 0
    for record in records:
        seq = core_sequence(tokens, record, model.config.max_seq_len)
        if pack and pack_size + len(seq[0]) - 1 > pack_tokens:
            scores.append(_score_pack(model, pack, backend, device))
            pack, pack_size = [], 0
        pack.append(seq)
        pack_size += len(seq[0]) - 1
    if pack:
        scores.append(_score_pack(model, pack, backend, device))
    return torch.cat(scores).cpu().numpy() if scores else np.zeros((0, 2), dtype=np.float32)


def core_correct(kind: str, records: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per example (in order of first appearance): right or wrong. The lowest mean loss picks the choice (ties go
    to the first); a language-modelling example has one choice, right when reproduced exactly."""
    examples = records[:, CORE_RECORD_FIELDS.index("example")]
    gold = records[:, CORE_RECORD_FIELDS.index("gold")]
    _, first, group = np.unique(examples, return_index=True, return_inverse=True)
    correct = np.zeros(len(first), dtype=bool)
    for g in range(len(first)):
        rows = np.flatnonzero(group == g)
        chosen = rows[0] if kind == "language_modeling" else rows[np.argmin(scores[rows, 0])]
        correct[g] = scores[chosen, 1] == 1 if kind == "language_modeling" else gold[chosen] == 1
    return correct[np.argsort(first)]


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect: how CORE puts tasks of different chance levels on one scale."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core_task(model: GPT, shard: CoreShard, backend: str, device: str, pack_tokens: int = 0
                       ) -> dict[str, float]:
    """Accuracy of one task. Under torch.distributed each rank scores the examples with index % world == rank
    and the counts are summed over ranks."""
    world_size, rank = _world()
    examples = shard.records[:, CORE_RECORD_FIELDS.index("example")]
    mine = shard.records[examples % world_size == rank]
    model.eval()
    correct = core_correct(shard.kind, mine, score_core_records(model, shard.tokens, mine, backend, device,
                                                                 pack_tokens))
    model.train()
    counts = torch.tensor([float(correct.sum()), float(len(correct))], device=device, dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(counts)
    accuracy = float(counts[0] / counts[1]) if counts[1] else 0.0
    return {"accuracy": accuracy, "centered": centered_accuracy(accuracy, shard.baseline),
            "baseline": shard.baseline, "examples": int(counts[1])}


def evaluate_core(model: GPT, shards: Sequence[CoreShard], backend: str, device: str, pack_tokens: int = 0
                  ) -> dict[str, Any]:
    """Per-task results and CORE, the mean centred accuracy over the tasks given."""
    tasks = {shard.label: evaluate_core_task(model, shard, backend, device, pack_tokens) for shard in shards}
    core = float(np.mean([t["centered"] for t in tasks.values()])) if tasks else float("nan")
    return {"tasks": tasks, "core": core}


# ---------------------------------------------------------------------------------------------
# The whole pipeline from the command line: `python stackcore.py pipeline [--key=value ...]`
# ---------------------------------------------------------------------------------------------

def run_pipeline(overrides: Sequence[str]) -> None:
    """Run every notebook's twin in order, each in its own process, with the same preset (by default tiny on a
    CPU, offline; the real sizes on a GPU). Other settings go in STACK_<NAME> variables, which each notebook
    reads if it has that setting. Stops at the first notebook that fails."""
    if any(not arg.startswith("--preset") for arg in overrides):
        raise ConfigError("the pipeline takes only --preset=...; set other options as STACK_<NAME>=value")
    import subprocess

    notebooks = sorted(Path(__file__).resolve().parent.glob("notebooks/[0-9][0-9]_*.py"))
    for twin in notebooks:
        print(f"\n=== {twin.name} ===", flush=True)
        started = time.time()
        subprocess.run([sys.executable, str(twin), *overrides], check=True)
        print(f"=== {twin.name} done in {format_duration(time.time() - started)} ===", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["pipeline"]:
        sys.exit("usage: python stackcore.py pipeline [--preset=tiny|colab|speedrun|node]")
    run_pipeline(sys.argv[2:])
