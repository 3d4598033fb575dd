"""DecoderStack's one shared module: everything the notebooks import, in the order a training step uses it.

Sections (and the notebooks that call them):
  1. Artifacts and devices ............ every notebook (STACK_HOME layout, GPU tier, dtype, CPU threads)
  2. Tokenizer ........................ every notebook (01_tokenizer trains it; 02-07 load it)
  3. Shards ........................... 02_sharding writes them; 03-06 read them
  4. Triton kernels ................... 03_pretrain (through the optimizer)
 4b. fp8 matmuls ...................... 03_pretrain (through the model's linear layers and head)
  5. Attention backends ............... 03-07 (through the model)
  6. Model ............................ 03-07 (with the KV cache and modded-nanogpt's key offset and paired heads)
  7. Optimizer and schedules .......... 03_pretrain, 05_sft, 06_rl (Muon, AdamW, fp16 loss scaling)
  8. Pretraining loader ............... 03_pretrain, 04_core_eval (validation bits per byte)
 8b. Batching ......................... 03-06 (token budgets, host-to-device copies)
  9. Evaluation: bits per byte ........ 03_pretrain, 04_core_eval
 10. Checkpoints, distributed set-up .. 03-07 (reading checkpoints; process groups, rank shares)
 11. CORE evaluation .................. 04_core_eval (02_sharding writes its shards with data/core.py)
 12. Chat format, calculator, engine .. 02_sharding, 05_sft, 06_rl, 07_chat (render conversations, KV-cache
                                        generation; 05's chat evaluations call it from data/chat_eval.py)
 13. Supervised fine-tuning ........... 05_sft (the SFT loader; 02_sharding writes its shards with data/sft.py)
Beside the notebooks, in notebooks/: config.py (every notebook's settings: presets, STACK_* variables, flags),
runtime.py (the first cell: Colab installs, Drive, GPU report), training.py (writing checkpoints, resuming, run
logs, 03's window and batch ramps), core_eval.py (04's samples), sft.py and rl.py (05's and 06's steps),
chat_session.py (07's chat), runs.py (04, 05 and 07 find a run's checkpoint by its name), report.py (the report
card) and pipeline.py (`python3 stackcore.py pipeline`).

The notebooks keep the training loops in view; this file holds the reusable and performance-critical parts.
"""
from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import operator
import os
import random
import sys
import time
import typing
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, TypeVar

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
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:
    flex_attention = BlockMask = None

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

# ---------------------------------------------------------------------------------------------
# 1. Artifacts and devices (used by every notebook)
# ---------------------------------------------------------------------------------------------
# STACK_HOME/tokenizer, shards, checkpoints and runs hold what one notebook leaves for the next.

ARTIFACT_KINDS = ("tokenizer", "shards", "checkpoints", "runs", "downloads")
COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ConfigError(ValueError):
    """A bad option, setting value, preset or STACK_HOME."""


def stack_home(environ: typing.Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("STACK_HOME", "~/.cache/decoderstack")).expanduser()


def make_writable_folder(path: Path) -> None:
    """Make `path` and its parents where missing; an OSError says why it cannot be written (a file in the way)."""
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(13, "Permission denied")


def artifact_dir(kind: str, create: bool = True) -> Path:
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; valid: {', '.join(ARTIFACT_KINDS)}")
    path = stack_home() / kind
    if create:
        try:
            make_writable_folder(path)
        except OSError as error:
            raise ConfigError(f"STACK_HOME {stack_home()} is not writable ({error.strerror}: {path}); point "
                              f"STACK_HOME at a folder you can write") from None
    return path


class MissingArtifactError(FileNotFoundError):
    """An earlier notebook's output is missing; in Colab the message adds how notebooks share STACK_HOME on Drive."""

    def __str__(self) -> str:
        from notebooks.runtime import colab_drive_hint

        return super().__str__() + colab_drive_hint(os.environ)


def require_artifact(path: Path, made_by: str) -> Path:
    """Return `path` if it exists, else stop with a message naming the notebook that makes it."""
    path = Path(path)
    if not path.exists():
        raise MissingArtifactError(f"{path} not found: run notebooks/{made_by} first (STACK_HOME is {stack_home()})")
    return path


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class GpuInfo:
    """What the presets need to know about a GPU (tests describe made-up ones)."""
    name: str
    capability: tuple[int, int]  # CUDA compute capability: (7, 5) T4, (8, 0) A100, (8, 9) L4, (9, 0) H100
    memory_gb: float  # 10^9 bytes, as GPUs are sold: an A100 40GB has 42.5

    @property
    def has_bf16(self) -> bool:
        return self.capability >= (8, 0)

    @property
    def has_fp8(self) -> bool:
        return self.capability >= (8, 9)


def current_gpu(device: str | torch.device = "cuda") -> GpuInfo | None:
    """The GPU `device` names (the current one for plain "cuda"), or None for the CPU or a machine without CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    return GpuInfo(props.name, (props.major, props.minor), round(props.total_memory / 1e9, 1))


def compute_dtype_for(gpu: GpuInfo | None, requested: str = "auto") -> torch.dtype:
    """`requested`, or for "auto" bf16 where the GPU has it, fp16 on older ones (a T4: LossScaler), fp32 on the CPU."""
    if requested == "auto":
        return torch.float32 if gpu is None else torch.bfloat16 if gpu.has_bf16 else torch.float16
    if requested not in COMPUTE_DTYPES:
        raise ConfigError(f"unknown dtype {requested!r}; valid: auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[requested]


def pick_compute_dtype(device: str) -> torch.dtype:
    """The matmul dtype on `device`: STACK_DTYPE if set, else compute_dtype_for's automatic choice."""
    return compute_dtype_for(current_gpu(device), os.environ.get("STACK_DTYPE", "auto"))


# ---------------------------------------------------------------------------------------------
# 2. Tokenizer (used by every notebook: 01_tokenizer trains it, 02-07 load it)
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


class Tokenizer:
    """A tiktoken Encoding with our special tokens, plus the byte length of every token for bits per byte."""

    def __init__(self, ranks: dict[bytes, int], pattern: str = SPLIT_PATTERN, name: str = "decoderstack"):
        import tiktoken

        self.ranks, self.pattern, self.name = ranks, pattern, name
        self.specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=self.specials)
        self.bos_id = self.special_id("<|bos|>")
        # a hash of what decides the ids (ranks, split pattern, special tokens): shards and checkpoints record it
        self.fingerprint = hashlib.sha1(repr((sorted(ranks.items()), pattern, self.specials)).encode()).hexdigest()[:12]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, name: str = "decoderstack") -> "Tokenizer":
        """Train a byte-level BPE whose vocabulary, special tokens included, has exactly `vocab_size` entries."""
        import rustbpe

        merges_wanted = vocab_size - len(SPECIAL_TOKENS)
        if merges_wanted < 256:
            raise ConfigError(f"vocab_size {vocab_size} is too small: it needs 256 byte tokens "
                             f"+ {len(SPECIAL_TOKENS)} special tokens")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), merges_wanted, pattern=SPLIT_PATTERN)
        ranks = {bytes(piece): rank for piece, rank in trainer.get_mergeable_ranks()}
        if len(ranks) < merges_wanted:
            raise ConfigError(f"the training text supports only {len(ranks) + len(SPECIAL_TOKENS)} tokens, not "
                              f"vocab_size {vocab_size}: give more text (corpus, max_chars) or a lower vocab_size")
        return cls(ranks, trainer.get_pattern(), name)

    def save(self, directory: Path) -> None:
        """Write tiktoken's rank file, then a JSON of name, pattern and special tokens (last: the folder is whole)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        by_rank = sorted(self.ranks.items(), key=lambda kv: kv[1])  # tiktoken's format: base64 token, space, rank
        (directory / TOKENIZER_RANKS).write_text("".join(f"{base64.b64encode(p).decode()} {r}\n" for p, r in by_rank))
        meta = {"name": self.name, "pattern": self.pattern, "special_tokens": self.specials}
        (directory / TOKENIZER_META).write_text(json.dumps(meta, indent=1))

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        """Read the rank file ourselves: tiktoken's `load_tiktoken_bpe` caches a file by its path (in the temp
        folder), so after 01 retrains a vocabulary in place it would go on returning the old ranks."""
        directory = Path(directory)
        ranks_file, meta_file = (require_artifact(directory / name, made_by="01_tokenizer")
                                 for name in (TOKENIZER_RANKS, TOKENIZER_META))
        try:  # a damaged file, checked here: tiktoken's own checks end in a Rust panic, which is no Exception
            ranks = {}
            for number, line in enumerate((damaged := ranks_file).read_text().splitlines(), 1):
                try:  # tiktoken's format: base64 token, space, rank
                    token, rank = line.split(" ")
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"line {number} is not '<base64 token> <rank>': {line[:60]!r}") from None
            if not ranks or sorted(ranks.values()) != list(range(len(ranks))):
                raise ValueError(f"ranks must be 0, 1, 2, ..., one per distinct token ({len(ranks)} read)")
            meta = json.loads((damaged := meta_file).read_text())
            tokenizer = cls(ranks, meta["pattern"], meta["name"])
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{damaged} is damaged ({type(error).__name__}: {error}): run notebooks/01_tokenizer "
                             f"again") from None
        if tokenizer.specials != meta.get("special_tokens"):
            raise ValueError(f"{meta_file}: its special tokens are not this version's {list(SPECIAL_TOKENS)} numbered "
                             f"after the {len(ranks)} ranks of {ranks_file} (a cut rank file, or another version's)")
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


# ---------------------------------------------------------------------------------------------
# 3. Shards (written by 02_sharding; read by 03-06)
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


def check_shard_items(path: Path, items: np.ndarray, kind: str, vocab_size: int, dtype: type) -> None:
    """Refuse what the dtype would silently change (floats cast, values wrapped) and ids outside the vocabulary."""
    if items.size and not (np.issubdtype(items.dtype, np.integer) or items.dtype == np.bool_):
        raise ShardError(f"{path}: {kind} must be integers, got an array of {items.dtype}")
    if kind == "records" and items.ndim != 2:
        raise ShardError(f"{path}: records must be a 2-D table, got shape {items.shape}")
    if not items.size:
        return
    low, high = int(items.min()), int(items.max())
    limit = np.iinfo(dtype)
    if kind == "tokens" and (low < 0 or (vocab_size and high >= vocab_size)):
        raise ShardError(f"{path}: token ids must lie in [0, {vocab_size}), got [{low}, {high}]")
    if low < limit.min or high > limit.max:
        hint = ": pass the tokenizer's vocab_size, so that the shard stores uint32" if kind == "tokens" else ""
        raise ShardError(f"{path}: {kind} values [{low}, {high}] do not fit {limit.dtype} "
                         f"[{limit.min}, {limit.max}]{hint}")


def write_shard(path: Path, items: np.ndarray, kind: str = "tokens", vocab_size: int = 0) -> Path:
    """Write one shard atomically (a temporary file renamed into place, so a crash never leaves half a shard)."""
    path, items = Path(path), np.asarray(items)
    version = (1 if vocab_size <= 2**16 else 2) if kind == "tokens" else {"mask": 3, "records": 4}[kind]
    dtype = SHARD_VERSIONS[version][1]
    check_shard_items(path, items, kind, vocab_size, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:5] = (SHARD_MAGIC, version, items.shape[0], vocab_size, items.shape[1] if kind == "records" else 1)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(items.astype(dtype, copy=False).tobytes())
    os.replace(tmp, path)
    return path


def read_shard(path: Path, vocab_size: int | None = None, kind: str | None = None) -> np.ndarray:
    """Memory-map a shard after checking its header, size and `kind` (tokens where vocab_size is given: each id too)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: no such shard file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: truncated: {size} bytes is less than the {HEADER_BYTES}-byte header")
    magic, version, count, _, width = (int(v) for v in np.fromfile(path, dtype=np.int32, count=5))
    if magic != SHARD_MAGIC:
        raise ShardError(f"{path}: not a shard (magic number {magic}, expected {SHARD_MAGIC})")
    if version not in SHARD_VERSIONS:
        raise ShardError(f"{path}: unknown shard version {version} (known: {sorted(SHARD_VERSIONS)})")
    found, dtype = SHARD_VERSIONS[version]
    kind = kind or ("tokens" if vocab_size is not None else found)
    if found != kind:  # a token shard where its mask belongs, or the other way round
        raise ShardError(f"{path}: a {found} shard (version {version}) where a {kind} shard was expected")
    width = max(width, 1)
    expected = HEADER_BYTES + count * width * np.dtype(dtype).itemsize
    if size != expected:
        raise ShardError(f"{path}: truncated or padded: header promises {expected} bytes, file has {size}")
    items = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES,
                      shape=(count, width) if kind == "records" else (count,))
    if vocab_size is not None and kind == "tokens" and items.size and int(items.max()) >= vocab_size:
        raise ShardError(f"{path}: token id {int(items.max())} is beyond the vocabulary of {vocab_size}: "
                         f"these shards were made with another tokenizer: run notebooks/02_sharding again")
    return items


def list_shards(directory: Path, split: str) -> list[Path]:
    """A split's token shards in order, `*{split}_*.bin` (ours and modded's `fineweb_*`), side files excluded."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ShardError(f"{directory}: shard directory not found (run notebooks/02_sharding first)")
    paths = sorted(p for p in directory.glob(f"*{split}_*.bin") if p.name.count(".") == 1)
    if not paths:
        raise ShardError(f"{directory}: no '{split}' shards (*{split}_*.bin) in this directory")
    return paths


def side_file(token_shard: Path, kind: str) -> Path:
    """The parallel file holding `kind` (mask or records) for a token shard: train_000000.bin -> .mask.bin."""
    return Path(token_shard).with_name(f"{Path(token_shard).stem}.{kind}.bin")


class ShardWriter:
    """Documents into `prefix_000000.bin`, ... of about `shard_tokens` tokens, none split, so each starts with BOS."""

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

    def next_path(self) -> Path:
        return self.directory / f"{self.prefix}_{len(self.written):06d}.bin"

    def flush(self) -> None:
        if not self.pending:
            return
        path = write_shard(self.next_path(), np.concatenate(self.pending), "tokens", self.vocab_size)
        self.written.append((path, self.pending_tokens, len(self.pending)))
        self.pending, self.pending_tokens = [], 0


# ---------------------------------------------------------------------------------------------
# 4. Triton kernels (used by 03_pretrain, through the Muon optimizer)
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
        # K is constexpr: the triton 3.6 interpreter cannot loop to a runtime K (Muon sees few shapes). One program
        # per output tile; only tiles on or above the diagonal work, and an off-diagonal one is stored again with row
        # and column strides swapped, which writes its transpose into the mirrored tile.
        tile_row, tile_col, batch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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


def symmetric_matmul(x: Tensor, alpha: float = 1.0, addend: Tensor | None = None, beta: float = 0.0,
                     block_m: int = 128, block_k: int = 64) -> Tensor:
    """symmetric_matmul_reference (`addend` symmetric) from the tiles on and above the diagonal only, half the FLOPs,
    in fp32 (TF32 for fp32 on CUDA), on CUDA or under TRITON_INTERPRET=1 (set before importing triton)."""
    if triton is None or not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
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
# 4b. fp8 matmuls (used by 03_pretrain, through CastedLinear and the loss)
# ---------------------------------------------------------------------------------------------
# torch._scaled_mm multiplies two fp8 matrices on tensor cores (compute capability 8.9 and up) and rescales the fp32
# accumulator: out = scale_a * scale_b * (a @ b). Each operand's one scale is amax / the format's largest value
# (current scaling). Activations and weights are e4m3 (more mantissa), gradients e5m2 by default (more range).
# Master weights stay fp32 and outputs come back in the compute dtype: fp8 exists only inside the matmul. Under
# torch.compile, an input that feeds several linears (q, k, v) is quantised once: common-subexpression elimination.

FP8_FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MIN_AMAX = 1e-12  # floor of amax: an all-zero tensor gets a tiny finite scale (zeros stay zeros), never 0/0
FP8_DIM_MULTIPLE = 16  # torch._scaled_mm on CUDA: the inner dimension and both of the second operand's


class Fp8Tensor(typing.NamedTuple):
    """A quantised matrix: `data` (fp8, row-major) times `scale` (fp32 scalar) approximates the original."""
    data: Tensor
    scale: Tensor

    def transposed(self) -> "Fp8Tensor":
        """Row-major again (torch._scaled_mm wants its operands in fixed layouts)."""
        return Fp8Tensor(self.data.t().contiguous(), self.scale)


def quantize_fp8(x: Tensor, dtype: torch.dtype, amax: Tensor | None = None) -> Fp8Tensor:
    """x in `dtype` scaled by its amax, or by a known bound `amax` of |x| (saving a pass). Clamped before the cast,
    which out of range gives NaN, inf or 448 by device; a NaN or inf in x spreads, as in a bf16 matmul."""
    limit = torch.finfo(dtype).max
    scale = (x.abs().amax() if amax is None else amax).float().clamp(min=FP8_MIN_AMAX) / limit
    return Fp8Tensor((x.float() / scale).clamp(-limit, limit).to(dtype).contiguous(), scale)


def fp8_shapes_ok(*dims: int) -> bool:
    """Whether matmuls over these dimensions (tokens, inputs, outputs) fit torch._scaled_mm, forward and backward."""
    return all(dim % FP8_DIM_MULTIPLE == 0 for dim in dims)


def fp8_mm(a: Fp8Tensor, b: Fp8Tensor, out_dtype: torch.dtype, fast_accum: bool = False) -> Tensor:
    """a @ b.T for row-major a (M, K) and b (N, K): b.T is the column-major operand _scaled_mm requires. Fast
    accumulation (fewer fp32 promotions) suits short inner dimensions, not the weight gradient's sum over tokens."""
    return torch._scaled_mm(a.data, b.data.t(), scale_a=a.scale, scale_b=b.scale, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)


def fp8_supported(device: str | torch.device, compute_dtype: torch.dtype) -> bool:
    """fp8 matmuls run here: a CUDA GPU of compute capability 8.9 or more (L4, H100, H200) computing in bf16."""
    gpu = current_gpu(device)
    return gpu is not None and gpu.has_fp8 and compute_dtype == torch.bfloat16


class _Fp8Linear(torch.autograd.Function):
    """x @ weight.T, the weight quantised by the caller (dynamo cannot lift its symbolic sizes into a second such
    function of one graph; `weight` carries the gradient). Backward reuses the fp8 operands: half bf16's memory."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, w_data: Tensor, w_scale: Tensor, grad_dtype: torch.dtype) -> Tensor:
        x8 = quantize_fp8(x, torch.float8_e4m3fn)
        ctx.save_for_backward(x8.data, x8.scale, w_data, w_scale)
        ctx.grad_dtype, ctx.weight_dtype = grad_dtype, weight.dtype
        return fp8_mm(x8, Fp8Tensor(w_data, w_scale), x.dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_data, x_scale, w_data, w_scale = ctx.saved_tensors
        g8 = quantize_fp8(grad_out, ctx.grad_dtype)
        grad_x = fp8_mm(g8, Fp8Tensor(w_data, w_scale).transposed(), grad_out.dtype)
        grad_weight = fp8_mm(g8.transposed(), Fp8Tensor(x_data, x_scale).transposed(), ctx.weight_dtype)
        return grad_x, grad_weight, None, None, None


def fp8_linear(x: Tensor, weight: Tensor, grad_format: str = "e5m2") -> Tensor:
    """x @ weight.T in x's dtype through fp8 matmuls, gradients in `grad_format`, for shapes that fp8_shapes_ok."""
    w8 = quantize_fp8(weight.detach(), torch.float8_e4m3fn)
    return _Fp8Linear.apply(x, weight, w8.data, w8.scale, FP8_FORMATS[grad_format])


# ---------------------------------------------------------------------------------------------
# 5. Attention backends (used by notebooks 03-07, through the model)
# ---------------------------------------------------------------------------------------------
# All backends take packed documents, q, k, v (T, H, D) with boundaries cu_seqlens (B+1,) int32, and return (T, H, D).
# Attention is causal within a document; `window` (None: unlimited) limits a query at position p to the keys
# p-window+1 .. p. flex also takes a BlockMask (flex_block_mask, built outside torch.compile) as `window`.

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
    # FlashAttention's (left, right): keys visible before / after the query, -1 unlimited; `window` counts the query
    return (-1, 0) if window is None else (window - 1, 0)


def _window_visible(since: Tensor, window: int | None) -> Tensor:
    """Visible keys from `since`, how many positions each key lies before each query: 0 .. window - 1 (None: >= 0)."""
    return (since >= 0) & (since < window) if window else since >= 0


def _records_grad(*tensors: Tensor) -> bool:
    """Whether autograd records a pass over `tensors`: the backends with no backward of their own choose by it."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _sdpa_attention(q, k, v, cu_seqlens, max_seqlen, window):
    """Reference backend: one SDPA per document; `window` may be a mask_mod (shared_prefix_mask_mod), made dense."""
    outputs, bounds = [], cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qd, kd, vd = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (H, L, D)
        tokens, mask = torch.arange(start, end, device=q.device), None
        if callable(window):
            mask = window(0, 0, tokens[:, None], tokens)
        elif window is not None and window < end - start:
            mask = _window_visible(tokens[:, None] - tokens, window)
        out = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, is_causal=mask is None)
        outputs.append(out.transpose(0, 1))
    return torch.cat(outputs)


def _window_limit(window: int | None, total_len: int, device: torch.device) -> Tensor:
    """The window as a tensor, not a Python int, so that masks of every window share one compiled kernel."""
    return torch.full((), total_len + 1 if window is None else window, device=device)


def _document_mask_mod(doc_ids: Tensor, window: int | None):
    """FlexAttention mask_mod: same document, causal, and inside the sliding window (None: the whole document)."""
    limit = _window_limit(window, doc_ids.numel(), doc_ids.device)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < limit)
    return mask_mod


def build_block_mask(mask_mod, total_len: int, device: torch.device) -> BlockMask:
    """FlexAttention block mask of `mask_mod` over a packed row; compiled on a GPU, so no dense T x T mask exists."""
    return create_block_mask(mask_mod, None, None, total_len, total_len, device=device, _compile=device.type == "cuda")


FLEX_BLOCK_SIZE = 128  # FlexAttention's default block: block masks cover a packed row in whole blocks


def flex_block_mask(cu_seqlens: Tensor, total_len: int, window: int | None) -> BlockMask:
    """FlexAttention block mask of one packing and window, from tensors only (no host sync)."""
    mask_mod = _document_mask_mod(document_ids(cu_seqlens, total_len), window)
    return build_block_mask(mask_mod, total_len, cu_seqlens.device)


def shared_prefix_mask_mod(documents: Tensor, branches: Tensor, positions: Tensor, window: int | None):
    """FlexAttention mask_mod for packed prefix trees (CORE's choices after one context). Per packed token: document,
    branch (0: the prefix its branches share) and position in its branch's sequence, which attends as if alone."""
    limit = _window_limit(window, documents.numel(), documents.device)

    def mask_mod(b, h, q_idx, kv_idx):
        seen_branch = (branches[kv_idx] == 0) | (branches[kv_idx] == branches[q_idx])
        return ((documents[q_idx] == documents[kv_idx]) & (q_idx >= kv_idx) & seen_branch
                & (positions[q_idx] - positions[kv_idx] < limit))
    return mask_mod


@lru_cache(maxsize=None)
def _compiled(function: typing.Callable, compile_backend: str = "inductor", dynamic: bool | None = None
              ) -> typing.Callable:
    """torch.compile of `function`, made once per setting, so that every caller shares its graphs."""
    return torch.compile(function, backend=compile_backend, dynamic=dynamic)


def _flex_attention(q, k, v, cu_seqlens, max_seqlen, window, compiled=None):
    """`window` is an int, None, or a BlockMask from flex_block_mask (the model's way: no mask building here)."""
    if q.device.type == "cpu":
        if _records_grad(q, k, v):
            # FlexAttention has no CPU backward: SDPA differentiates the same mask_mod, evaluated densely
            positions = torch.arange(q.size(0), device=q.device)
            mask_mod = (window.mask_mod if isinstance(window, BlockMask)
                        else _document_mask_mod(document_ids(cu_seqlens, q.size(0)), window))
            mask = mask_mod(0, 0, positions[:, None], positions)
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(0, 1)
        q, k, v = q.detach(), k.detach(), v.detach()  # torch rejects requires_grad CPU inputs even under no_grad
    block_mask = window if isinstance(window, BlockMask) else flex_block_mask(cu_seqlens, q.size(0), window)
    compiled = q.is_cuda if compiled is None else compiled
    attend = _compiled(flex_attention, "inductor", False) if compiled else flex_attention
    out = attend(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), block_mask=block_mask)
    return out.squeeze(0).transpose(0, 1)


def _varlen_attention(q, k, v, cu_seqlens, max_seqlen, window):
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=_flash_window(window))


def _first_importable(attribute: str, module_names: Sequence[str]) -> Any:
    """`attribute` of the first of these modules that imports and has it, else None."""
    for module_name in module_names:
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except Exception:  # ImportError, or a broken CUDA / CUTLASS install raising anything else
            continue
    return None


@lru_cache(maxsize=1)
def _flash_varlen_function():
    """flash_attn_varlen_func of FA3 (flash_attn_interface), FA4 (flash_attn.cute) or FA2, whichever imports."""
    return _first_importable("flash_attn_varlen_func", ("flash_attn_interface", "flash_attn.cute", "flash_attn"))


def _call_flash(q, k, v, cu_seqlens, max_seqlen, window):
    # FA2-4 share these keywords; FA4 wants None, not -1, for no left limit; FA4 and some FA3 builds return (out, lse)
    function = _flash_varlen_function()
    left, right = _flash_window(window)
    if left < 0 and function.__module__.startswith("flash_attn.cute"):
        left = None
    out = function(q, k, v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                   max_seqlen_k=max_seqlen, causal=True, window_size=(left, right))
    return out[0] if isinstance(out, tuple) else out


@torch.library.custom_op("stackcore::flash_forward", mutates_args=())
def _flash_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, window: int) -> Tensor:
    """FlashAttention's forward as one op that torch.compile does not look into (window 0: unlimited): traced, FA4's
    Python breaks every compiled layer in two, and each graph costs host time per layer and pass."""
    return _call_flash(q, k, v, cu_seqlens, max_seqlen, window or None).contiguous()  # the layout of the fake


@_flash_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, window):
    return torch.empty_like(q)


_flash_with_grad = torch.compiler.disable(_call_flash)  # FlashAttention's own autograd: one graph break, not FA4's many


def _flash_attention(q, k, v, cu_seqlens, max_seqlen, window):
    if _records_grad(q, k, v):
        return _flash_with_grad(q, k, v, cu_seqlens, max_seqlen, window)
    return _flash_forward(q, k, v, cu_seqlens, max_seqlen, window or 0)


_ATTENTION_FUNCTIONS = {"flash": _flash_attention, "varlen": _varlen_attention, "flex": _flex_attention,
                        "sdpa": _sdpa_attention}


def attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
              window: int | None = None, backend: str = "sdpa") -> Tensor:
    """Causal, document-masked (optionally sliding-window) attention over packed (T, H, D) tensors."""
    if backend not in _ATTENTION_FUNCTIONS:
        raise ValueError(f"unknown attention backend {backend!r}; valid names: {list(ATTENTION_BACKENDS)}")
    return _ATTENTION_FUNCTIONS[backend](q, k, v, cu_seqlens, max_seqlen, window)


def _backend_importable(name: str, device: torch.device) -> bool:
    if name in ("flash", "varlen") and device.type != "cuda":
        return False
    if name == "flash":
        return _flash_varlen_function() is not None
    if name == "varlen":  # torch 2.9/2.10's varlen_attn has no window_size: unusable for sliding windows
        return varlen_attn is not None and "window_size" in inspect.signature(varlen_attn).parameters
    return name == "sdpa" or flex_attention is not None


def _matches_sdpa(attend: typing.Callable, device: torch.device, dtype: torch.dtype, backward: bool = True) -> bool:
    """A tiny forward (and backward) of `attend` against the sdpa reference, without and with a window."""
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v, upstream = torch.randn(4, 40, 2, 64, device=device, dtype=dtype, generator=generator)
    cu_seqlens = torch.tensor([0, 1, 13, 40], device=device, dtype=torch.int32)
    for window in (None, 5):
        results = []
        for function in (attend, _sdpa_attention):
            inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
            out = function(*inputs, cu_seqlens, 27, window)
            results.append([out, *(torch.autograd.grad(out, inputs, upstream) if backward else ())])
        if not all(torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2) for a, b in zip(*results)):
            return False
    return True


@lru_cache(maxsize=None)
def _backend_works(name: str, device: torch.device) -> bool:
    """Imports, and matches the sdpa reference; flex uncompiled and forward only (compiling is for real calls)."""
    if name == "sdpa" or not _backend_importable(name, device):
        return name == "sdpa"
    dtype = compute_dtype_for(current_gpu(device))
    try:
        with warnings.catch_warnings():  # flex uncompiled, on purpose: torch warns about it
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            if name == "flex":
                return _matches_sdpa(lambda *args: _flex_attention(*args, compiled=False), device, dtype, False)
            return _matches_sdpa(_ATTENTION_FUNCTIONS[name], device, dtype)
    except Exception:
        return False


def available_attention_backends(device: torch.device | str) -> list[str]:
    """Backends that import and give correct results on `device` in this process, in preference order."""
    device = torch.device(device)
    return [name for name in ATTENTION_BACKENDS if _backend_works(name, device)]


def pick_attention_backend(device: torch.device | str, requested: str = "auto") -> str:
    """`requested` if it works on `device`, the best working backend for "auto", else ValueError. "auto" is sdpa on
    the CPU (flex has no CPU backward) and on GPUs without bf16 (a T4), which FlashAttention and varlen lack."""
    available = available_attention_backends(device)
    if requested == "auto":
        gpu = current_gpu(device)
        return "sdpa" if gpu is None or not gpu.has_bf16 else available[0]
    if requested not in available:
        raise ValueError(f"attention backend {requested!r} is not available on {device}; "
                         f"valid names here: {['auto', *available]} (all backends: {list(ATTENTION_BACKENDS)})")
    return requested


# ---------------------------------------------------------------------------------------------
# 6. Model (used by notebooks 03-07)
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
    key_offset: bool = False  # modded-nanogpt #169: in long-window layers, half of each key is the previous token's
    paired_head_layers: tuple[int, ...] = ()  # modded-nanogpt #191: pairs of heads attend as one (interleave_pairs)
    smear: bool = False  # modded-nanogpt's 2025-09-18 record: an embedding takes a gated share of its predecessor's
    backout: bool = False  # modded-nanogpt's 2025-10-04 record: the head reads x less a share of x at backout_layer

    def __post_init__(self):
        if self.dim % self.head_dim:
            raise ConfigError(f"model_dim {self.dim} must be divisible by head_dim {self.head_dim}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even (rotary embeddings rotate pairs)")
        if not self.window_pattern or set(self.window_pattern) - {"S", "L"}:
            raise ConfigError(f"window_pattern {self.window_pattern!r} must be a non-empty string of 'S' and 'L'")
        if self.n_value_embeds < 0:
            raise ConfigError(f"n_value_embeds {self.n_value_embeds} must be >= 0")
        if self.key_offset and self.head_dim % 4:
            raise ConfigError(f"key_offset needs head_dim {self.head_dim} divisible by 4 (a rotating half of pairs)")
        self.paired_head_layers = tuple(sorted(set(self.paired_head_layers)))  # a checkpoint stores a list
        outside = [layer for layer in self.paired_head_layers if not 0 <= layer < self.depth]
        if outside:
            raise ConfigError(f"paired_head_layers {outside} are not layers of a depth-{self.depth} model")
        if self.paired_head_layers and self.n_heads % 2:
            raise ConfigError(f"paired_head_layers need an even number of heads, not {self.n_heads}")
        if self.backout and self.depth < 2:
            raise ConfigError("backout needs depth >= 2: it backs out an earlier layer's residual before the last")

    @property
    def dim(self) -> int:
        return self.model_dim or 64 * self.depth

    @property
    def n_heads(self) -> int:
        return self.dim // self.head_dim

    @property
    def value_embed_tables(self) -> int:
        return min(self.n_value_embeds, self.depth // 2)  # each table feeds two distinct layers

    @property
    def window(self) -> int:
        return self.short_window or self.max_seq_len // 2

    @property
    def rotary_dims(self) -> int:
        """How many leading dimensions of each head rotary turns: half with the key offset (the rest stays put)."""
        return self.head_dim // 2 if self.key_offset else self.head_dim

    @property
    def plain_documents_only(self) -> bool:
        """The key offset, smear and paired heads read a packed row as plain documents: no caller's mask says
        otherwise (the first two read each token's predecessor, GPT.trick_inputs)."""
        return self.key_offset or self.smear or bool(self.paired_head_layers)

    @property
    def backout_layer(self) -> int:
        """How many layers have written the residual that backout subtracts: two thirds of the depth. modded's record
        took 8 of 11, where learned per-layer backout weights turned from positive to negative; nanochat takes half."""
        return 2 * self.depth // 3

    def modded_architecture(self) -> GPTConfig:
        """With modded-nanogpt's key offset, and paired heads in those of its layers 0, 2, 5, 9 that the depth has: the
        architecture baselines/2026-11-30-d12-switches measured, kept so that its command means what it meant."""
        paired = [layer for layer in (0, 2, 5, 9) if layer < self.depth]  # modded's train_gpt.py pairs these
        return dataclasses.replace(self, key_offset=True, paired_head_layers=paired)


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
    """Rotate the first R = 2 * cos.size(-1) dimensions of x (T, H, D) by per-token angles (T, R/2), pairing
    dimension i with i + R/2; the other D - R stay put. Paired heads pass x (T, H/2, 2, D) with angles (T, 2, R/2)."""
    rotated = 2 * cos.size(-1)
    x1, x2 = x[..., :rotated].chunk(2, dim=-1)
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, x[..., rotated:]), dim=-1)


class CastedLinear(nn.Linear):
    """Bias-free linear layer: an fp32 master weight cast to `compute_dtype`; fp8_linear with GPT.set_fp8."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.compute_dtype = torch.float32
        self.fp8_grad_format: str | None = None

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.compute_dtype)
        if (self.fp8_grad_format and torch.is_grad_enabled() and x.dim() == 2
                and fp8_shapes_ok(x.size(0), *self.weight.shape)):
            return fp8_linear(x, self.weight, self.fp8_grad_format)
        return F.linear(x, self.weight.to(self.compute_dtype))


@lru_cache(maxsize=1)
def _flash_kvcache_function():
    """FA3's or FA2's flash_attn_with_kvcache (FA4 has none): it reads each cache row only up to the row's length."""
    return _first_importable("flash_attn_with_kvcache", ("flash_attn_interface", "flash_attn"))


@torch.library.custom_op("stackcore::flash_decode", mutates_args=())
def _flash_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens: Tensor, window: int) -> Tensor:
    """Queries (B, L, H, D) against cache rows (B, capacity, H, D; only the last dimension contiguous), row b holding
    seqlens[b] positions, causal, window 0 unlimited. One op that torch.compile keeps whole, as _flash_forward."""
    left, right = _flash_window(window or None)
    out = _flash_kvcache_function()(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True, window_size=(left, right))
    return (out[0] if isinstance(out, tuple) else out).contiguous()


@_flash_decode.register_fake
def _(q, k_cache, v_cache, seqlens, window):
    return torch.empty_like(q)


class KVCache:
    """Keys and values (depth, batch, heads, capacity, head_dim) and each row's filled length `lengths` (B,), a tensor
    that a replayed decode step advances. GPT.forward(ids (B, L), kv_cache=cache) puts L new tokens at each row's next
    positions; rows whose `advancing` is 0 are overwritten next pass, a full row at its last position. `carried`: other
    per-layer state (depth, batch, ...): with the key offset "previous_half", each row's last key half (offset_keys);
    with smear "previous_embedding" (1, batch, dim), each row's last embedding (GPT.smear_embeddings)."""

    def __init__(self, config: GPTConfig, batch_size: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype):
        if not 1 <= capacity <= config.max_seq_len:
            raise ValueError(f"cache capacity {capacity} must be in 1..max_seq_len ({config.max_seq_len})")
        shape = (config.depth, batch_size, config.n_heads, capacity, config.head_dim)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.advancing = torch.ones(batch_size, dtype=torch.long, device=device)
        half = config.head_dim - config.rotary_dims  # the stationary half that the key offset carries
        self.carried = {"previous_half": self.k.new_zeros(shape[:3] + (half,))} if config.key_offset else {}
        if config.smear:
            self.carried["previous_embedding"] = self.k.new_zeros((1, batch_size, config.dim))
        self.empty = True  # no pass has written these rows: the next pass is a prefill (host-side, no sync)
        self.parent: KVCache | None = None  # the cache whose rows this one views (rows(), PackedPrompts)

    @property
    def capacity(self) -> int:
        return self.k.size(3)

    @property
    def batch_size(self) -> int:
        return self.k.size(1)

    def packing(self, ids: Tensor) -> tuple[Tensor, Tensor, int, Tensor]:
        """New tokens (B, L) as a packed pass: flat ids, one document per row, L, and each token's row position."""
        if ids.ndim != 2 or ids.size(0) != self.batch_size:
            raise ValueError(f"a pass through a KV cache of {self.batch_size} rows takes ids of shape "
                             f"({self.batch_size}, tokens), got {tuple(ids.shape)}")
        B, L = ids.shape
        if self.empty and L > self.capacity:
            raise ValueError(f"{L} tokens exceed the cache's capacity of {self.capacity} positions")
        positions = self.lengths[:, None] + torch.arange(L, device=ids.device)
        cu_seqlens = torch.arange(0, B * L + 1, L, dtype=torch.int32, device=ids.device)
        return ids.reshape(-1), cu_seqlens, L, positions.clamp_(max=self.capacity - 1).view(-1)

    def write(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        """Store a layer's keys and values (B * L, heads, head_dim) of L new tokens per row at their positions."""
        B = self.batch_size
        rows, at = torch.arange(B, device=k.device)[:, None], positions.view(B, -1)
        self.k[layer, rows, :, at] = k.view(B, at.size(1), *k.shape[1:])
        self.v[layer, rows, :, at] = v.view(B, at.size(1), *v.shape[1:])

    def attend(self, layer: int, q: Tensor, window: int | None, positions: Tensor, paired: bool = False) -> Tensor:
        """Queries (B * L, H, D) at `positions` attend to their row's cached keys less than `window` back.
        FlashAttention's cache kernel reads each row only up to its length; SDPA reads the whole capacity under a
        mask, so that no shape depends on the lengths. `paired` heads (modded-nanogpt #191) view a pair as one head
        over 2 x capacity keys, whose order a softmax ignores; the mask knows their interleaved positions 2p + i."""
        B, H, capacity, D = self.k[layer].shape
        at = positions.view(B, -1)
        L = at.size(1)
        if not paired and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_kvcache_function():
            seqlens = (at[:, -1] + 1).to(torch.int32)  # FlashAttention aligns the L queries to the end of the row
            y = _flash_decode(q.view(B, L, H, D), self.k[layer].transpose(1, 2), self.v[layer].transpose(1, 2),
                              seqlens, window or 0)
            return y.reshape(q.shape)
        group = 2 if paired else 1  # heads viewed as one
        queries = q.view(B, L, H // group, group, D).permute(0, 2, 3, 1, 4).reshape(B, H // group, group * L, D)
        keys, values = (t.view(B, H // group, group * capacity, D) for t in (self.k[layer], self.v[layer]))
        which = torch.arange(group, device=q.device)[:, None]
        query_at = (group * at[:, None] + which).view(B, group * L)
        key_at = (group * torch.arange(capacity, device=q.device) + which).view(group * capacity)
        since = query_at[:, :, None] - key_at  # (B, group * L, group * capacity)
        y = F.scaled_dot_product_attention(queries, keys, values, attn_mask=_window_visible(since, window)[:, None])
        return y.view(B, H // group, group, L, D).permute(0, 3, 1, 2, 4).reshape(q.shape)

    def advance(self, tokens: int) -> None:
        """After a pass of `tokens` per row: the advancing rows are longer; this cache and its parents are filled."""
        self.lengths.add_(tokens * self.advancing).clamp_(max=self.capacity)
        self._mark_filled()

    def _mark_filled(self) -> None:
        cache = self
        while cache is not None:
            cache.empty, cache = False, cache.parent

    def rows(self, start: int, stop: int) -> KVCache:
        """The rows start..stop-1, sharing this cache's memory (take views of a new cache before prefilling any)."""
        view = object.__new__(KVCache)
        view.k, view.v, view.lengths = self.k[:, start:stop], self.v[:, start:stop], self.lengths[start:stop]
        view.advancing, view.empty, view.parent = self.advancing[start:stop], self.empty, self
        view.carried = {name: state[:, start:stop] for name, state in self.carried.items()}
        return view


class PackedPrompts(KVCache):
    """A prefill of prompts of different lengths in one packed pass into empty rows of `cache`: prompt i's keys and
    values go straight into its `copies` rows from first_rows[i] on, so that no row is copied afterwards."""

    def __init__(self, cache: KVCache, prompt_lengths: Sequence[int], first_rows: Sequence[int], copies: int = 1):
        device = cache.k.device
        sizes = torch.tensor(list(prompt_lengths), device=device)
        if sizes.numel() != len(first_rows) or sizes.numel() == 0 or int(sizes.min()) < 1:
            raise ValueError(f"need one first row per non-empty prompt, got lengths {list(prompt_lengths)} "
                             f"and rows {list(first_rows)}")
        if max(prompt_lengths) > cache.capacity:
            raise ValueError(f"a prompt of {max(prompt_lengths)} tokens exceeds the cache's capacity of "
                             f"{cache.capacity} positions")
        self.k, self.v, self.lengths, self.advancing = cache.k, cache.v, cache.lengths, cache.advancing
        self.carried, self.empty, self.parent = cache.carried, True, cache
        self.cu_seqlens = F.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)
        self.total, self.longest = int(sizes.sum()), int(sizes.max())
        rows = torch.tensor(list(first_rows), device=device)[:, None] + torch.arange(copies, device=device)
        self.token_rows = rows[document_ids(self.cu_seqlens, self.total)]  # (T, copies)
        self.filled_rows, self.row_lengths = rows.flatten(), sizes.repeat_interleave(copies)

    def last_tokens(self) -> Tensor:
        """Index of each prompt's last token in the packed pass: the logit_rows of its next-token logits."""
        return self.cu_seqlens[1:].long() - 1

    def packing(self, ids: Tensor) -> tuple[Tensor, Tensor, int, Tensor]:
        if ids.ndim != 1 or ids.numel() != self.total:
            raise ValueError(f"a packed prefill of prompts of {self.total} tokens in all takes ids of shape "
                             f"({self.total},), got {tuple(ids.shape)}")
        return ids, self.cu_seqlens, self.longest, positions_in_documents(self.cu_seqlens, self.total)

    def write(self, layer: int, k: Tensor, v: Tensor, positions: Tensor) -> None:
        self.k[layer, self.token_rows, :, positions[:, None]] = k[:, None]
        self.v[layer, self.token_rows, :, positions[:, None]] = v[:, None]

    def advance(self, tokens: int) -> None:
        self.lengths[self.filled_rows] = self.row_lengths
        self._mark_filled()


@dataclass(frozen=True)
class AttentionBatch:
    """What each layer's attention reads in a pass (GPT.forward builds it): packed documents attending within
    themselves through `backend`; with a cache, row b's new tokens, kept at `positions`, reading it if `reads_cache`."""
    cu_seqlens: Tensor  # (documents + 1,) int32 boundaries of the packed tokens
    max_seqlen: int  # the longest document
    cos: Tensor  # (T, head_dim / 2) rotary angles of each packed token
    sin: Tensor
    backend: str = "sdpa"  # the attention backend (ATTENTION_BACKENDS)
    cache: KVCache | None = None
    positions: Tensor | None = None  # (T,) each token's position in its cache row (with a cache)
    reads_cache: bool = False
    previous: Tensor | None = None  # (T,) key offset: each token's predecessor in its document (itself at a start)
    paired_cos: Tensor | None = None  # (T, 2, rotary_dims / 2) with paired heads: angles at interleaved positions
    paired_sin: Tensor | None = None  # 2t and 2t + 1, for the first and second head of a pair


def previous_tokens(own: Tensor, batch: AttentionBatch, carried: Tensor | None) -> Tensor:
    """Each packed token's predecessor's row of `own` (T, ...), its own at a document's start. With a cache, a row's
    first new token takes the row's `carried` (B, ...) if the row held tokens, which keeps each row's last token."""
    shifted = own[batch.previous]
    cache = batch.cache
    if isinstance(cache, PackedPrompts):  # prompts from position 0: each prompt's rows keep its last token's row
        last = own[cache.last_tokens()]
        carried[cache.filled_rows] = last.repeat_interleave(cache.filled_rows.numel() // last.size(0), dim=0)
    elif cache is not None:
        rows, per_row = carried.size(0), (-1,) + (1,) * (carried.dim() - 1)  # per_row: a row's flag over carried
        own_rows, shifted_rows = own.view(rows, -1, *own.shape[1:]), shifted.view(rows, -1, *own.shape[1:])
        continues = (batch.positions.view(rows, -1)[:, 0] > 0).view(per_row)  # the row held tokens before this pass
        first = torch.where(continues, carried, shifted_rows[:, 0])
        shifted = torch.cat((first[:, None], shifted_rows[:, 1:]), dim=1).view_as(own)
        advances = (cache.advancing > 0).view(per_row)  # a row that does not advance repeats its position next pass
        carried.copy_(torch.where(advances, own_rows[:, -1], carried))
    return shifted


def offset_keys(k: Tensor, batch: AttentionBatch, layer: int) -> Tensor:
    """The partial key offset (modded-nanogpt #169): each key's stationary half becomes the previous token's, but at a
    document's start (unlike modded: a prompt decodes as it trains); a cache carries it over (KVCache.carried)."""
    half = k.size(-1) // 2
    carried = None if batch.cache is None else batch.cache.carried["previous_half"][layer]
    return torch.cat((k[..., :half], previous_tokens(k[..., half:], batch, carried)), dim=-1)


def interleave_pairs(x: Tensor) -> Tensor:
    """(T, H, D) -> (2T, H/2, D): row 2t + i holds token t's head 2j + i in head j (modded-nanogpt #191)."""
    T, H, D = x.shape
    return x.view(T, H // 2, 2, D).transpose(1, 2).reshape(2 * T, H // 2, D)


def split_pairs(y: Tensor) -> Tensor:
    """The inverse of interleave_pairs: (2T, H/2, D) -> (T, H, D)."""
    T2, pairs, D = y.shape
    return y.view(T2 // 2, 2, pairs, D).transpose(1, 2).reshape(T2 // 2, 2 * pairs, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, has_value_embed: bool, paired: bool = False,
                 key_offset: bool = False):
        super().__init__()
        self.layer = layer  # which layer of a KV cache this attention writes and reads
        self.paired, self.key_offset = paired, key_offset  # GPTConfig's tricks, if this layer takes them
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.c_q, self.c_k, self.c_v, self.c_proj = (CastedLinear(config.dim, config.dim) for _ in range(4))
        self.value_mix = nn.Parameter(torch.full((2,), 0.5)) if has_value_embed else None

    def forward(self, x: Tensor, value_embed: Tensor | None, window: Any, batch: AttentionBatch,
                logit_rows: Tensor | None = None) -> Tensor:
        """x (T, dim) -> (T, dim), or only its rows `logit_rows` (see Block); `window`: an int, None or a mask."""
        T = x.size(0)
        q, k, v = (linear(x).view(T, self.n_heads, self.head_dim) for linear in (self.c_q, self.c_k, self.c_v))
        if value_embed is not None:
            v = self.value_mix[0] * v + self.value_mix[1] * value_embed.view_as(v)
        q, k = norm(q), norm(k)  # QK-norm, then rotary
        if self.paired:  # each head of a pair turned to its own interleaved position
            q, k = (apply_rotary(t.view(T, -1, 2, self.head_dim), batch.paired_cos, batch.paired_sin).view_as(t)
                    for t in (q, k))
        else:
            q, k = apply_rotary(q, batch.cos, batch.sin), apply_rotary(k, batch.cos, batch.sin)
        if self.key_offset:
            k = offset_keys(k, batch, self.layer)
        if batch.cache is not None:
            batch.cache.write(self.layer, k, v, batch.positions)
        if batch.reads_cache:
            y = batch.cache.attend(self.layer, q, window, batch.positions, self.paired)
        elif self.paired:  # the window counts interleaved positions, as in modded: w of them are w / 2 tokens
            y = split_pairs(attention(*map(interleave_pairs, (q, k, v)), 2 * batch.cu_seqlens, 2 * batch.max_seqlen,
                                      window, batch.backend))
        else:
            y = attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window, batch.backend)
        y = y.reshape(T, -1)
        return self.c_proj(y if logit_rows is None else y[logit_rows])


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = CastedLinear(config.dim, config.mlp_ratio * config.dim)
        self.c_proj = CastedLinear(config.mlp_ratio * config.dim, config.dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int, has_value_embed: bool, paired: bool = False,
                 key_offset: bool = False):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer, has_value_embed, paired, key_offset)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, value_embed: Tensor | None, window: Any, batch: AttentionBatch,
                logit_rows: Tensor | None = None) -> Tensor:
        """With `logit_rows` (N,) only those rows go on past attention (the last layer's: nothing reads the others)."""
        y = self.attn(norm(x), value_embed, window, batch, logit_rows)
        x = x + y if logit_rows is None else x[logit_rows] + y
        return x + self.mlp(norm(x))


def residual_mix(x: Tensor, x0: Tensor, resid_lambda: Tensor, x0_lambda: Tensor, skip: Tensor | None = None,
                 skip_weight: Tensor | None = None) -> Tensor:
    """A block's input: resid_lambda * (x + skip_weight * skip) + x0_lambda * x0 (U-net skips in the second half)."""
    if skip is not None:
        x = x + skip_weight * skip
    return resid_lambda * x + x0_lambda * x0


def _run_block(block: Block, *args: Any) -> Tensor:
    """A block as an argument: compiled (with dynamic shapes), all layers of one structure share one graph."""
    return block(*args)


@lru_cache(maxsize=None)
def _compiled_layer_stack(compile_backend: str, inductor_options: tuple[tuple[str, Any], ...] = ()):
    """GPT.run_layers as one graph for evaluation: one compiled call per pass instead of two per layer, whose host
    time a forward-only pass has no backward to hide behind. `inductor_options`: torch._inductor.config pairs."""
    options = {"options": dict(inductor_options)} if inductor_options else {}
    return torch.compile(GPT.run_layers, dynamic=True, backend=compile_backend, **options)


def soft_cap(logits: Tensor, softcap: float) -> Tensor:
    """softcap * tanh(logits / softcap) in fp32: logits squashed smoothly into (-softcap, softcap)."""
    return softcap * torch.tanh(logits.float() / softcap)


def _softcapped_ce_rows(logits: Tensor, targets: Tensor, softcap: float) -> tuple[Tensor, Tensor]:
    """Per-row soft-capped cross-entropy (0 at target -1) and its gradient for `logits`: what torch.compile fuses."""
    capped = soft_cap(logits, softcap)
    lse = torch.logsumexp(capped, dim=-1)
    valid = targets >= 0
    target = targets.clamp(min=0)
    loss = torch.where(valid, lse - capped.gather(1, target[:, None]).squeeze(1), 0.0)
    onehot = target[:, None] == torch.arange(capped.size(-1), device=capped.device)
    grad = torch.where(valid[:, None], torch.exp(capped - lse[:, None]) - onehot.float(), 0.0)
    return loss, (grad * (1 - (capped / softcap) ** 2)).to(logits.dtype)


def _softcapped_ce_rows_fp8(logits: Tensor, targets: Tensor, softcap: float, grad_dtype: torch.dtype
                            ) -> tuple[Tensor, Fp8Tensor, Fp8Tensor]:
    """_softcapped_ce_rows with the gradient quantised for the fp8 head, row-major and transposed, in the same graph.
    Its scale comes from a bound: softmax minus one-hot lies in [-1, 1] and the soft cap's derivative in [0, 1]."""
    losses, grad = _softcapped_ce_rows(logits, targets, softcap)
    g8 = quantize_fp8(grad, grad_dtype, amax=grad.new_ones((), dtype=torch.float32))
    return losses, g8, g8.transposed()


def _ce_chunk(h: Tensor, w: Tensor, w8: tuple[Fp8Tensor, Fp8Tensor] | None, targets: Tensor, softcap: float,
              compile_backend: str | None, fp8_grad_format: str | None) -> tuple[Tensor, Tensor, Tensor]:
    """One chunk's per-row losses and gradients (h's, and the head's in fp32); in fp8 given `w8` and shapes that fit."""
    if w8 is None or not fp8_shapes_ok(h.size(0), *w.shape):
        rows = _compiled(_softcapped_ce_rows, compile_backend) if compile_backend else _softcapped_ce_rows
        losses, grad_logits = rows(h @ w.mT, targets, softcap)
        return losses, grad_logits @ w, (grad_logits.mT @ h).float()
    rows = _compiled(_softcapped_ce_rows_fp8, compile_backend) if compile_backend else _softcapped_ce_rows_fp8
    h8 = quantize_fp8(h, torch.float8_e4m3fn)
    logits = fp8_mm(h8, w8[0], h.dtype, fast_accum=True)
    losses, g8, g8_transposed = rows(logits, targets, softcap, FP8_FORMATS[fp8_grad_format])
    return losses, fp8_mm(g8, w8[1], h.dtype), fp8_mm(g8_transposed, h8.transposed(), torch.float32)


class _SoftcappedCrossEntropySum(torch.autograd.Function):
    """Sum of the soft-capped cross-entropy, its gradients formed chunk by chunk in forward: no fp32 logits whole."""

    @staticmethod
    def forward(ctx, h, weight, targets, softcap, chunk_tokens, compile_backend, fp8_grad_format):
        w = weight.to(h.dtype)
        w8 = quantize_fp8(weight, torch.float8_e4m3fn) if fp8_grad_format else None
        head8 = None if w8 is None else (w8, w8.transposed())
        total = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32)  # summed over chunks in fp32
        for start in range(0, h.size(0), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            losses, grad_h[part], grad_w_part = _ce_chunk(h[part], w, head8, targets[part], softcap,
                                                          compile_backend, fp8_grad_format)
            total += losses.sum()
            grad_w += grad_w_part
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_output.to(grad_h.dtype), grad_w * grad_output, None, None, None, None, None


def softcapped_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, softcap: float, reduction: str = "mean",
                             chunk_tokens: int = 8192, compile_backend: str | None = None,
                             fp8_grad_format: str | None = None) -> Tensor:
    """F.cross_entropy(soft_cap(h @ weight.T, softcap), targets, ignore_index=-1), `chunk_tokens` rows of logits at a
    time; with gradients and a "mean" or "sum", each chunk's gradient is formed at once (compiled, fp8 if asked)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"unknown reduction {reduction!r}; use 'mean', 'sum' or 'none'")
    if _records_grad(h, weight) and reduction != "none":
        total = _SoftcappedCrossEntropySum.apply(h, weight, targets, softcap, chunk_tokens, compile_backend,
                                                 fp8_grad_format)
    else:
        w = weight.to(h.dtype)
        losses = torch.cat([F.cross_entropy(soft_cap(h[i:i + chunk_tokens] @ w.mT, softcap),
                                            targets[i:i + chunk_tokens], ignore_index=-1, reduction="none")
                            for i in range(0, h.size(0), chunk_tokens)])
        if reduction == "none":
            return losses
        total = losses.sum()
    return total if reduction == "sum" else total / (targets >= 0).sum()


# Suggested learning rates (modded-nanogpt-like); Muon's is relative to the orthogonalised update. The Adam lrs of
# embeddings and head are for model_dim 768, scaled by (model_dim / 768) ** -0.5 (nanochat's rule) in param_groups.
SMEAR_GATE_CHANNELS = 12  # the leading embedding channels the smear gate reads (modded's 12)
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
        self.blocks = nn.ModuleList(Block(config, i, self.value_embed_index(i) is not None, *self.layer_tricks(i))
                                    for i in range(config.depth))
        self.lm_head = CastedLinear(config.dim, config.vocab_size)
        self.resid_lambdas = nn.Parameter(torch.ones(config.depth))   # block input = resid * x + x0 * x0
        self.x0_lambdas = nn.Parameter(torch.zeros(config.depth))
        self.skip_weights = nn.Parameter(torch.ones(config.depth // 2))  # U-net: layer i -> layer depth-1-i
        self.smear_gate = nn.Parameter(torch.zeros(min(SMEAR_GATE_CHANNELS, config.dim))) if config.smear else None
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if config.smear else None
        self.backout_lambda = nn.Parameter(torch.zeros(1)) if config.backout else None
        for name, table in zip(("rotary_cos", "rotary_sin"), self.rotary()):
            self.register_buffer(name, table, persistent=False)
        self.compile_backend: str | None = None  # see compile_layers()
        self.compile_evaluation = False
        self.inductor_options: tuple[tuple[str, Any], ...] = ()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Embeddings N(0, 1), q, k, v, fc of std 1/sqrt(fan_in), output projections and head 0: loss ln(vocab)."""
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
        for scalars, value in ((self.resid_lambdas, 1.0), (self.x0_lambdas, 0.0), (self.skip_weights, 1.0),
                               (self.smear_gate, 0.0), (self.smear_lambda, 0.0), (self.backout_lambda, 0.5)):
            if scalars is not None:  # smear starts off (lambda 0), backout at modded's 0.5
                scalars.fill_(value)
        for buffer, table in zip((self.rotary_cos, self.rotary_sin), self.rotary(self.rotary_cos.device)):
            buffer.copy_(table)

    def set_compute_dtype(self, dtype: torch.dtype) -> None:
        """Matmul / activation dtype: bf16 on GPUs that have it, fp16 on e.g. a T4, fp32 on CPU."""
        self.compute_dtype = dtype
        for module in self.modules():
            if isinstance(module, CastedLinear):
                module.compute_dtype = dtype

    def set_fp8(self, enabled: bool, grad_format: str = "e5m2") -> None:
        """fp8 matmuls (fp8_linear), gradients in `grad_format`, in every CastedLinear's passes with gradients whose
        shapes fit. Needs bf16 on a GPU with fp8 (fp8_supported); weights, optimizer and checkpoints are unchanged."""
        if grad_format not in FP8_FORMATS:
            raise ValueError(f"unknown fp8 gradient format {grad_format!r}; valid: {', '.join(FP8_FORMATS)}")
        for linear in (module for module in self.modules() if isinstance(module, CastedLinear)):
            linear.fp8_grad_format = grad_format if enabled else None

    def cast_weights_for_inference(self) -> "GPT":
        """Evaluation only: weights in the compute dtype, never cast again, in half the memory; training needs fp32."""
        for param in self.parameters():
            if param.ndim >= 2:
                param.data = param.data.to(self.compute_dtype)
        return self

    def compile_layers(self, compile_backend: str = "inductor", evaluation: bool = False,
                       inductor_options: dict[str, Any] | None = None) -> "GPT":
        """Regional torch.compile for training: one block graph per layer structure, small graphs for the residual
        mixing and the loss, dynamic windows and lengths (a growing window recompiles nothing). With `evaluation`,
        gradient-free passes compile all layers as one graph (for CORE); sdpa and KV-cache passes run eagerly."""
        if inductor_options and compile_backend != "inductor":
            raise ValueError(f"inductor_options need the inductor compile backend, not {compile_backend!r}")
        # CORE's graphs per kind of pass and shape specialisation can pass dynamo's default limit of 8 per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 16)
        options = tuple(sorted((inductor_options or {}).items()))
        try:
            hash(options)
        except TypeError:
            raise ValueError(f"inductor_options values must be hashable (bools, numbers, strings): {options}") from None
        self.compile_backend, self.compile_evaluation, self.inductor_options = compile_backend, evaluation, options
        return self

    def rotary(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """The rotary tables, config.rotary_dims wide; twice as long with paired heads (interleaved positions)."""
        length = self.config.max_seq_len * (2 if self.config.paired_head_layers else 1)
        return rotary_tables(length, self.config.rotary_dims, device=device)

    def layer_tricks(self, layer: int) -> tuple[bool, bool]:
        """(paired heads, key offset) of `layer`: the offset goes to unpaired long-window layers, as in modded."""
        paired = layer in self.config.paired_head_layers
        return paired, self.config.key_offset and self.layer_windows()[layer] is None and not paired

    def value_embed_index(self, layer: int) -> int | None:
        """Which value-embedding table feeds `layer` (U-net symmetric), or None."""
        mirrored = min(layer, self.config.depth - 1 - layer)
        return mirrored if mirrored < self.config.value_embed_tables else None

    def layer_windows(self, short_window: int | None = None) -> list[int | None]:
        """Each layer's window: `short_window` (default config.window) in "S" layers, None (causal) in "L" and last."""
        short = short_window or self.config.window
        pattern = self.config.window_pattern
        windows = [short if pattern[i % len(pattern)] == "S" else None for i in range(self.config.depth)]
        windows[-1] = None
        return windows

    def forward(self, input_ids: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int = 0,
                target_ids: Tensor | None = None, *, windows: list[Any] | None = None, backend: str = "sdpa",
                loss_reduction: str = "mean", positions: Tensor | None = None, logit_rows: Tensor | None = None,
                kv_cache: KVCache | None = None) -> Tensor:
        """The one forward pass of training, evaluation, prefill and decoding. input_ids (T,) are packed documents
        (default: one); returns fp32 logits (T, vocab), or with targets the cross-entropy over targets != -1 ("none":
        per-token losses). `windows` may hold masks (a BlockMask on flex, a mask_mod on sdpa) which, with rotary
        `positions`, lay tokens out otherwise (CORE's shared prefixes); only rows `logit_rows` reach the head. With
        `kv_cache`, input_ids (B, L) are L new tokens per row, logits are (B, L, vocab) and the cache advances by L."""
        config = self.config
        shape = input_ids.shape
        if kv_cache is not None:
            if target_ids is not None or positions is not None:
                raise ValueError("a pass through a KV cache takes no target_ids or positions: the cache places tokens")
            input_ids, cu_seqlens, max_seqlen, positions = kv_cache.packing(input_ids)
        elif cu_seqlens is None:
            cu_seqlens = torch.tensor([0, input_ids.size(0)], dtype=torch.int32, device=input_ids.device)
            max_seqlen = input_ids.size(0)
        if max_seqlen > config.max_seq_len:
            raise ValueError(f"max_seqlen {max_seqlen} exceeds config.max_seq_len {config.max_seq_len}")
        windows = self.layer_windows() if windows is None else windows
        if len(windows) != config.depth:
            raise ValueError(f"need one window per layer ({config.depth}), got {len(windows)}")
        if config.plain_documents_only and not all(window is None or isinstance(window, int) for window in windows):
            raise ValueError("a model with key_offset, smear or paired_head_layers takes windows as ints or None, not "
                             "masks: it reads the packed tokens as plain documents (GPTConfig.plain_documents_only)")
        reads_cache = kv_cache is not None and not kv_cache.empty
        if backend == "flex" and not reads_cache:
            windows = self.flex_masks(windows, cu_seqlens, input_ids.size(0))
        # each token's position in its packed document: the default positions, and the key offset's predecessors
        in_documents = (positions_in_documents(cu_seqlens, input_ids.size(0))
                        if positions is None or config.key_offset or config.smear else None)
        positions = in_documents if positions is None else positions
        batch = AttentionBatch(cu_seqlens, max_seqlen, self.rotary_cos[positions], self.rotary_sin[positions], backend,
                               kv_cache, positions if kv_cache is not None else None, reads_cache,
                               *self.trick_inputs(positions, in_documents))
        x0 = self.wte(input_ids).to(self.compute_dtype)
        if config.smear:  # a token has a predecessor past its document's (or cache row's) position 0
            x0 = self.smear_embeddings(x0, batch, (in_documents if kv_cache is None else positions) > 0)
        x0 = norm(x0)
        value_embeds = [table(input_ids).to(self.compute_dtype) for table in self.value_embeds]
        layer_args = (x0, value_embeds, windows, batch, logit_rows)
        compiled = torch.is_grad_enabled() or self.compile_evaluation
        compile_backend = self.compile_backend if compiled and kv_cache is None else None
        # sdpa loops over the documents on the host, which torch.compile cannot trace: its layers run eagerly
        if not compile_backend or backend == "sdpa":
            x = self.run_layers(*layer_args)
        elif torch.is_grad_enabled():
            x = self.run_layers(*layer_args, _compiled(residual_mix, compile_backend, True),
                                _compiled(_run_block, compile_backend, True))
        else:
            x = _compiled_layer_stack(compile_backend, self.inductor_options)(self, *layer_args)
        if kv_cache is not None:
            kv_cache.advance(max_seqlen)
        if target_ids is not None:
            return softcapped_cross_entropy(norm(x), self.lm_head.weight, target_ids, config.softcap, loss_reduction,
                                            compile_backend=compile_backend,
                                            fp8_grad_format=self.lm_head.fp8_grad_format)
        logits = soft_cap(self.lm_head(norm(x)), config.softcap)
        return logits.view(*shape, -1) if kv_cache is not None and logit_rows is None else logits

    def flex_masks(self, windows: list[Any], cu_seqlens: Tensor, total_len: int) -> list[Any]:
        """Each layer's window as a FlexAttention block mask, one per window and length, built outside compiled code."""
        masks: dict[tuple[Any, bool], Any] = {}
        for window, block in zip(windows, self.blocks):
            key = (window, block.attn.paired)
            if key not in masks:
                scale = 2 if block.attn.paired else 1
                masks[key] = (window if isinstance(window, BlockMask)
                              else flex_block_mask(scale * cu_seqlens, scale * total_len, window))
        return [masks[window, block.attn.paired] for window, block in zip(windows, self.blocks)]

    def trick_inputs(self, positions: Tensor, in_documents: Tensor | None) -> tuple[Tensor | None, ...]:
        """AttentionBatch's previous, paired_cos and paired_sin (None where the model does without that trick)."""
        config = self.config
        previous = paired_cos = paired_sin = None
        if config.key_offset or config.smear:
            previous = torch.arange(positions.numel(), device=positions.device) - (in_documents > 0).long()
        if config.paired_head_layers:
            interleaved = 2 * positions[:, None] + torch.arange(2, device=positions.device)
            paired_cos, paired_sin = self.rotary_cos[interleaved], self.rotary_sin[interleaved]
        return previous, paired_cos, paired_sin

    def smear_embeddings(self, x: Tensor, batch: AttentionBatch, has_previous: Tensor) -> Tensor:
        """Smear (modded-nanogpt's 2025-09-18 record): embeddings x (T, dim) plus smear_lambda * sigmoid(smear_gate .
        x's first channels) times the predecessor's embedding, none at a document's start; a cache carries it over."""
        carried = None if batch.cache is None else batch.cache.carried["previous_embedding"][0]
        gate = self.smear_gate.to(x.dtype)
        share = self.smear_lambda.to(x.dtype) * torch.sigmoid(x[:, :gate.numel()] @ gate)
        return x + torch.where(has_previous, share, 0)[:, None] * previous_tokens(x, batch, carried)

    def run_layers(self, x0: Tensor, value_embeds: list[Tensor], windows: list[Any], batch: AttentionBatch,
                   logit_rows: Tensor | None = None, mix: typing.Callable = residual_mix,
                   run_block: typing.Callable = _run_block) -> Tensor:
        """The blocks with residual mixing and U-net skips, x0 to the last hidden state, compiled parts given."""
        n_skip = self.config.depth // 2
        x, skips, backout = x0, [], None
        for i, block in enumerate(self.blocks):
            mirror = self.config.depth - 1 - i
            skip = (skips[mirror], self.skip_weights[mirror]) if mirror < n_skip else ()
            x = mix(x, x0, self.resid_lambdas[i], self.x0_lambdas[i], *skip)
            table = self.value_embed_index(i)
            value_embed = None if table is None else value_embeds[table]
            x = run_block(block, x, value_embed, windows[i], batch, logit_rows if i == self.config.depth - 1 else None)
            if i < n_skip:
                skips.append(x)
            if self.backout_lambda is not None and i == self.config.backout_layer - 1:
                backout = x  # backout (modded's 2025-10-04 record): what helps later layers, not the prediction
        if backout is not None:
            x = x - self.backout_lambda.to(x.dtype) * (backout if logit_rows is None else backout[logit_rows])
        return x

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
        """Training FLOPs per token, elementwise work aside: 6 per matmul weight, plus 12 * n_heads * head_dim times
        the mean keys per query: n / 2 causal, w - w^2 / (2n) for a window w < n (n: length, interleaved if paired)."""
        counts = self.num_params()
        windows = self.layer_windows() if windows is None else windows
        lengths = [seq_len * (2 if block.attn.paired else 1) for block in self.blocks]
        attended = sum(n / 2 if w is None or w >= n else w - w * w / (2 * n) for w, n in zip(windows, lengths))
        return 6 * (counts["matrices"] + counts["head"]) + 12 * self.config.n_heads * self.config.head_dim * attended

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes per token (keys and values of every layer; value embeds need no cache)."""
        return 2 * self.config.depth * self.config.dim * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# 7. Optimizer and schedules (used by 03_pretrain, 05_sft, 06_rl)
# ---------------------------------------------------------------------------------------------

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, same for every step


def _minimax_odd_quintic(lo: float, hi: float) -> tuple[float, float, float]:
    """(a, b, c) of the odd quintic a x + b x^3 + c x^5 closest to 1 in max-norm on [lo, hi], by Remez exchange
    (Amsel et al. 2025, App. D): p - 1 equioscillates at lo, the two interior extrema of p, and hi."""
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
    """Per-step quintics of Polar Express (Amsel et al. 2025) from the paper's recipe: the minimax quintic on the
    current singular-value interval (lo floored at cushion * hi), re-centred so p(lo) and p(hi) straddle 1 and, but
    in the last step, taken at x / safety, so that bf16 round-off cannot leave the next polynomial's interval."""
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
    """The polar factor U V^T of g (..., rows, cols) by an odd-polynomial iteration in the device's compute dtype
    ("newton_schulz" leaves singular values in about [0.7, 1.2]); tall ones go transposed: X X^T is the small one."""
    if method not in ("polar_express", "newton_schulz"):
        raise ValueError(f"unknown orthogonalization method {method!r}; use 'polar_express' or 'newton_schulz'")
    newton_schulz = (NEWTON_SCHULZ_COEFFICIENTS,) * steps
    coefficients = polar_express_coefficients(steps) if method == "polar_express" else newton_schulz
    x = g.to(compute_dtype_for(current_gpu(g.device)))
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


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024): Nesterov momentum on 2D matrices, the update replaced by its polar factor, scaled by
    max(1, rows / cols) ** 0.5, decoupled weight decay; one batched orthogonalisation per shape. Under several ranks,
    each keeps momentum for and orthogonalises its share of the reduce-scattered gradients, then all gather; with
    `distributed=False` every rank steps alone on the gradients it holds (03's demonstration on CPU tensors, which
    NCCL cannot reduce; step_optimizers averages them first, as AdamW's)."""

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, method: str = "polar_express", steps: int = 5, normuon: bool = False,
                 beta2: float = 0.95, cautious_weight_decay: bool = False, distributed: bool = True):
        self.distributed = distributed
        params = list(params)
        if any(p.ndim != 2 for p in params):
            raise ValueError("Muon only optimises 2D matrices; give other parameters to AdamW")
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == shape]} for shape in shapes]
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov, method=method,
                        steps=steps, normuon=normuon, beta2=beta2, cautious_weight_decay=cautious_weight_decay)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        world_size, rank = world_size_and_rank() if self.distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            per_rank = -(-len(params) // world_size)  # ceil: the last rank's share may be padded
            grads = params[0].new_zeros(per_rank * world_size, *params[0].shape)
            for i, p in enumerate(params):
                if p.grad is not None:
                    grads[i] = p.grad
            own_grads = _reduce_scatter_mean(grads, world_size, rank)
            own_params = self._share(params)
            update = torch.zeros_like(own_grads)
            if own_params:
                update[:len(own_params)] = self._orthogonal_update(group, own_params, own_grads[:len(own_params)])
            updates = _all_gather_stacked(update, world_size)[:len(params)]
            rows, cols = params[0].shape
            if group["weight_decay"]:
                self._decay(group, params, updates)
            torch._foreach_add_(params, updates.unbind(0), alpha=-group["lr"] * max(1.0, rows / cols) ** 0.5)

    @staticmethod
    def _decay(group: dict, params: list[Tensor], updates: Tensor) -> None:
        """p <- p * (1 - lr * weight_decay); cautious (Chen et al. 2025, arXiv 2510.12402) only where update and weight
        agree in sign, where the step already shrinks the weight: elsewhere decay would pull against the gradient."""
        shrink = group["lr"] * group["weight_decay"]
        if not group["cautious_weight_decay"]:
            torch._foreach_mul_(params, 1 - shrink)
            return
        agree = updates * torch.stack(params) >= 0
        torch._foreach_mul_(params, list((1 - shrink * agree.to(updates.dtype)).unbind(0)))

    def _share(self, params: list[Tensor]) -> list[Tensor]:
        """The matrices of a shape group that this rank orthogonalises (and keeps momentum for)."""
        share = rank_share(len(params)) if self.distributed else range(len(params))
        return params[share.start:share.stop]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load, then keep momentum for this rank's share: a checkpoint holds every rank's (see resume_training)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            own = {id(p) for p in self._share(group["params"])}
            for p in group["params"]:
                if id(p) not in own:
                    self.state.pop(p, None)

    def _orthogonal_update(self, group: dict, params: list[Tensor], grads: Tensor) -> Tensor:
        buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g)) for p, g in zip(params, grads)]
        momentum = group["momentum"]
        torch._foreach_lerp_(buffers, list(grads.unbind(0)), 1 - momentum)  # EMA of gradients
        stacked = torch.stack(buffers)
        direction = grads.lerp(stacked, momentum) if group["nesterov"] else stacked
        update = orthogonalize(direction, group["method"], group["steps"]).to(grads.dtype)
        return self._normalize_neurons(group, params, update) if group["normuon"] else update

    def _normalize_neurons(self, group: dict, params: list[Tensor], update: Tensor) -> Tensor:
        """NorMuon (Li et al. 2025, arXiv 2510.05491): each long-side slice (the short side is already balanced) over
        the root of an EMA of its mean square, the Frobenius norm restored: lr keeps its meaning, EMA bias cancels."""
        reduce = -1 if update.size(-2) >= update.size(-1) else -2  # average over the short side
        mean_square = update.square().mean(dim=reduce, keepdim=True)
        moments = [self.state[p].setdefault("second_moment", torch.zeros_like(m))
                   for p, m in zip(params, mean_square)]
        torch._foreach_lerp_(moments, list(mean_square.unbind(0)), 1 - group["beta2"])
        normalized = update * torch.stack(moments).clamp_min(1e-20).rsqrt()
        norms = update.norm(dim=(-2, -1), keepdim=True) / normalized.norm(dim=(-2, -1), keepdim=True).clamp_min(1e-20)
        return normalized * norms


def build_optimizers(model: GPT, muon_lr: float | None = None, adam_lrs: dict[str, float] | None = None,
                     weight_decay: float = 0.0, method: str = "polar_express", lr_scale: float = 1.0,
                     normuon: bool = False, cautious_weight_decay: bool = False) -> list[torch.optim.Optimizer]:
    """[AdamW(the rest), Muon(matrices)] at param_groups' lrs or `adam_lrs`, times `lr_scale`, as "initial_lr"."""
    low_precision = sorted({str(p.dtype) for p in model.parameters() if p.dtype != torch.float32})
    if low_precision:
        raise ValueError(f"the model holds {', '.join(low_precision)} weights (cast_weights_for_inference): training "
                         f"needs fp32 master weights; load the checkpoint again to train")
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
                weight_decay=weight_decay, method=method, normuon=normuon, cautious_weight_decay=cautious_weight_decay)
    for optimizer in (adam, muon):
        for group in optimizer.param_groups:
            group["lr"] *= lr_scale
            group["initial_lr"] = group["lr"]
    return [adam, muon]


def step_optimizers(optimizers: list[torch.optim.Optimizer]) -> None:
    """Average gradients over ranks (a distributed Muon does its own in step()), step every optimizer, clear them."""
    world_size, _ = world_size_and_rank()
    grads = [p.grad for optimizer in optimizers if not (isinstance(optimizer, Muon) and optimizer.distributed)
             for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if world_size > 1 and grads:
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()
        torch._foreach_div_(grads, world_size)
    for optimizer in optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


class LossScaler:
    """fp16 training (GPUs without bf16: the T4) through torch.amp.GradScaler, so that small gradients do not flush to
    zero; else step_optimizers. One process only: under torchrun, ranks would skip overflowing steps apart."""

    def __init__(self, compute_dtype: torch.dtype, device: str):
        enabled = compute_dtype == torch.float16
        if enabled and world_size_and_rank()[0] > 1:
            raise ConfigError("fp16 loss scaling runs in one process only: under torchrun set STACK_DTYPE=float32")
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=enabled)

    def scale(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss)

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if not self.scaler.is_enabled():
            return step_optimizers(optimizers)
        for optimizer in optimizers:
            self.scaler.step(optimizer)
            optimizer.zero_grad(set_to_none=True)
        self.scaler.update()


def apply_schedule(optimizers: list[torch.optim.Optimizer], lr_mult: float, momentum: float | None = None) -> None:
    """Set every group's lr to initial_lr * lr_mult and, if given, Muon's momentum."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult
            if momentum is not None and isinstance(optimizer, Muon):
                group["momentum"] = momentum


def lr_multiplier(step: int, total_steps: int, warmup_steps: int = 0, cooldown_frac: float = 0.4,
                  final_multiplier: float = 0.0) -> float:
    """Linear warmup to 1, flat, then linear decay to final_multiplier over the last cooldown_frac of the steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    cooldown_start = total_steps * (1 - cooldown_frac)
    progress = min(1.0, max(0.0, step - cooldown_start) / max(total_steps - cooldown_start, 1))
    return 1.0 - (1.0 - final_multiplier) * progress


def muon_momentum(step: int, warmup_steps: int = 300, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum ramped linearly from `start` to `end` over the first warmup_steps."""
    return start + (end - start) * min(1.0, step / warmup_steps) if warmup_steps > 0 else end


# ---------------------------------------------------------------------------------------------
# 8. Pretraining loader (used by 03_pretrain, 04_core_eval)
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

    @classmethod
    def on_device(cls, inputs: np.ndarray, targets: np.ndarray, cu_seqlens: np.ndarray, device: str) -> Batch:
        """A packed row built on the host, copied to `device`: how every loader hands it over."""
        return cls(*(host_to_device(a, device) for a in (inputs, targets, cu_seqlens)), int(np.diff(cu_seqlens).max()))


def document_boundaries(inputs: np.ndarray, bos_id: int, max_doc_len: int) -> np.ndarray:
    """cu_seqlens for a packed row: a boundary at position 0, at every BOS, and every max_doc_len inside a document."""
    starts = np.union1d([0], np.flatnonzero(inputs == bos_id))
    ends = np.append(starts[1:], len(inputs))
    bounds = [b for start, end in zip(starts, ends) for b in range(int(start), int(end), max_doc_len)]
    return np.asarray([*bounds, len(inputs)], dtype=np.int32)


class PretrainLoader:
    """Endless BOS-aligned batches from token shards, `tokens` per rank per call, wrapping around at the end."""
    position_shared = True  # every rank holds the same position: a checkpoint resumes under any number of ranks

    def __init__(self, shard_dir: Path, split: str, tokens: int, bos_id: int, vocab_size: int, max_doc_len: int,
                 rank: int = 0, world_size: int = 1, device: str = "cpu"):
        self.paths = list_shards(shard_dir, split)
        self.tokens, self.bos_id, self.vocab_size, self.max_doc_len = tokens, bos_id, vocab_size, max_doc_len
        self.rank, self.world_size, self.device = rank, world_size, device
        self.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})

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
        self.load_state_dict({"shard": shard % len(self.paths), "offset": 0, "epoch": epoch})

    def _take_row(self) -> np.ndarray:
        start = self._next_start(self.position["offset"])
        for _ in self.paths:  # each shard once from its start (the current one last): a row starts somewhere or nowhere
            if start is not None:
                break
            self._advance_shard()
            start = self._next_start(0)
        if start is None:
            raise ShardError(f"{self.paths[0].parent}: no shard of {', '.join(p.name for p in self.paths)} has a "
                             f"document start (BOS id {self.bos_id}) followed by {self.tokens} tokens, so no row of "
                             f"{self.tokens} tokens can begin at a document: wrong bos_id, or shards written without "
                             f"BOS, or rows longer than the shards' documents allow")
        self.position["offset"] = start + self.tokens
        return np.asarray(self.shard[start:start + self.tokens + 1], dtype=np.int64)

    def next_batch(self) -> Batch:
        row = [self._take_row() for _ in range(self.world_size)][self.rank]
        return Batch.on_device(row[:-1], row[1:], document_boundaries(row[:-1], self.bos_id, self.max_doc_len),
                               self.device)

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = dict(state)
        self._load_shard()


# ---------------------------------------------------------------------------------------------
# 8b. Batching (used by the loaders, CORE, chat evaluations and RL)
# ---------------------------------------------------------------------------------------------
# Every packed forward pass gets its tokens the same way: grouped under a token budget on the host, then copied to
# the device without waiting for it.

def host_to_device(array: np.ndarray, device: str | torch.device) -> Tensor:
    """`array` on `device`, through pinned memory for a GPU: an asynchronous copy, during which the host queues on."""
    tensor = torch.from_numpy(array)
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


ItemT = TypeVar("ItemT")


def budget_chunks(items: Iterable[ItemT], cost: typing.Callable[[ItemT], int], max_tokens: int
                  ) -> Iterator[list[ItemT]]:
    """Items in order, in groups costing at most max_tokens (a costlier one alone); lazily, as a pass runs meanwhile."""
    chunk: list[ItemT] = []
    total = 0
    for item in items:
        item_cost = cost(item)
        if chunk and total + item_cost > max_tokens:
            yield chunk
            chunk, total = [], 0
        chunk.append(item)
        total += item_cost
    if chunk:
        yield chunk


def token_budget_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped by budget_chunks (letter scoring and RL passes)."""
    return [[i for i, _ in chunk] for chunk in budget_chunks(enumerate(lengths), operator.itemgetter(1), max_tokens)]


# ---------------------------------------------------------------------------------------------
# 9. Evaluation: bits per byte (used by 03_pretrain, 04_core_eval)
# ---------------------------------------------------------------------------------------------
# Summed cross-entropy in nats over ln(2) x the UTF-8 bytes of the predicted tokens. Special tokens have 0 bytes
# and are left out of both sums, so the figure does not depend on the vocabulary.

@torch.no_grad()
def evaluate_bpb(model: GPT, loader: PretrainLoader, steps: int, token_bytes: Tensor, backend: str) -> float:
    """Bits per byte over `steps` batches of `loader` (each rank its own batches; summed over ranks)."""
    model.eval()
    nats, total_bytes = (torch.zeros((), device=token_bytes.device, dtype=torch.float64) for _ in range(2))
    for _ in range(steps):
        batch = loader.next_batch()
        losses = model(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, backend=backend,
                       loss_reduction="none")
        target_bytes = token_bytes[batch.targets]  # 0 for special tokens, which are left out of both sums
        nats += (losses.double() * (target_bytes > 0)).sum()  # no boolean indexing: it would sync with the GPU
        total_bytes += target_bytes.double().sum()
    model.train()
    nats, total_bytes = sum_over_ranks([nats, total_bytes])
    return nats / (math.log(2) * total_bytes)


# ---------------------------------------------------------------------------------------------
# 10. Checkpoints and distributed set-up (used by 03-07)
# ---------------------------------------------------------------------------------------------

def world_size_and_rank() -> tuple[int, int]:
    """(world_size, rank); (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


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
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"this process is local rank {local_rank}, but the node shows "
                              f"{torch.cuda.device_count()} GPU(s): start at most that many processes per node "
                              f"(torchrun --nproc_per_node), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to use the CPU")
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return DistInfo(rank, world_size, local_rank, device)


def _collective_device() -> str:
    """Where a small tensor must live for a collective: NCCL reduces on the GPU, gloo on the CPU."""
    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def sum_over_ranks(values: Sequence[float]) -> list[float]:
    """Each of `values` (per-rank counts) summed over all ranks in one all-reduce: a global-batch mean needs sums."""
    if not dist.is_initialized():
        return [float(value) for value in values]
    totals = torch.tensor([float(value) for value in values], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals)
    return totals.tolist()


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` holds on every rank, so that all ranks take the same branch (fall back to the same checkpoint)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor(int(ok), device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def rank_share(count: int) -> range:
    """This rank's run of ceil(count / ranks) of `count` items: item i keeps its index's seed on any world size."""
    world_size, rank = world_size_and_rank()
    per_rank = -(-count // world_size)
    return range(min(rank * per_rank, count), min((rank + 1) * per_rank, count))


class CheckpointError(ValueError):
    """A checkpoint that is damaged, foreign, of another model or vocabulary, or cannot resume the run as asked."""


class DamagedCheckpointError(CheckpointError):
    """A file that does not load (truncated, corrupted, foreign, pickled objects): resuming takes the one before."""


CHECKPOINT_MAKERS = {"pretrain": "03_pretrain", "sft": "05_sft", "rl": "06_rl"}  # default run name: its notebook


def checkpoint_paths(directory: Path) -> list[Path]:
    """The rank-0 checkpoints of a run folder, oldest first."""
    return sorted(Path(directory).glob("step_??????.pt"))


def latest_checkpoint(directory: Path) -> Path | None:
    return next(reversed(checkpoint_paths(directory)), None)


def load_checkpoint(path: Path, device: str = "cpu", made_by: str | None = None,
                    keys: Sequence[str] = ("model", "model_config", "step")) -> dict[str, Any]:
    """A checkpoint file holding `keys`, read with weights_only=True (other pickled objects are refused unread: they
    could run code); errors name the file and the notebook that writes it (`made_by`, else known from its folder)."""
    path = Path(path)
    made_by = made_by or CHECKPOINT_MAKERS.get(path.parent.name, "03_pretrain, 05_sft or 06_rl")
    require_artifact(path, made_by)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickle protocols before refusing them
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # zip, pickle and storage errors all mean one thing here: unusable
        reason = ("it holds Python objects other than tensors, numbers and strings, refused because loading them "
                  "could run code" if "weights_only" in str(error).lower() or "Unsupported global" in str(error)
                  else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'unreadable'}")
        raise DamagedCheckpointError(f"{path} is damaged or not a DecoderStack checkpoint ({reason}); it is written "
                                     f"by notebooks/{made_by}: run it again") from None
    missing = [key for key in keys if key not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise DamagedCheckpointError(f"{path} is not a DecoderStack checkpoint (no {', '.join(missing)}); they are "
                                     f"written by notebooks/{made_by}")
    return state


def model_from_checkpoint(path: Path, device: str, tokenizer: Tokenizer | None = None, made_by: str | None = None
                          ) -> tuple[GPT, dict[str, Any]]:
    """A checkpoint's model, refused for another tokenizer (by vocabulary size, and by fingerprint where recorded)."""
    checkpoint = load_checkpoint(path, device, made_by)
    vocab, fingerprint = checkpoint["model_config"]["vocab_size"], checkpoint.get("tokenizer_fingerprint")
    if tokenizer and (vocab, fingerprint or tokenizer.fingerprint) != (tokenizer.vocab_size, tokenizer.fingerprint):
        maker = checkpoint.get("made_by") or CHECKPOINT_MAKERS.get(path.parent.name, "03_pretrain")
        retrain = "03_pretrain" if maker == "03_pretrain" else f"each notebook from 03_pretrain to {maker} (its maker)"
        raise CheckpointError(f"{path} holds a model with a vocabulary of {vocab} tokens, but the tokenizer in "
                              f"{artifact_dir('tokenizer', create=False)} has {tokenizer.vocab_size} (fingerprint "
                              f"{tokenizer.fingerprint}; the model's: {fingerprint or 'not recorded'}): it was trained "
                              f"with another tokenizer; use that tokenizer's STACK_HOME, or run notebooks/02_sharding "
                              f"and {retrain} again")
    model = GPT(saved_model_config(path, checkpoint["model_config"])).to(device)
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


def saved_model_config(path: Path, saved: dict[str, Any]) -> GPTConfig:
    """The GPTConfig of checkpoint `path`: settings added to GPTConfig since it was saved take their defaults (off),
    so an older run still loads and resumes; a setting this code lacks (a newer DecoderStack's) is refused by name."""
    known = {field.name for field in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(saved) - known) if isinstance(saved, dict) else []
    if unknown:
        raise CheckpointError(f"{path} holds a model with setting(s) this code does not know ({', '.join(unknown)}): "
                              f"it was saved by a newer DecoderStack; update this code to load it")
    try:
        return GPTConfig(**saved)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path} holds a model configuration this code refuses: {error}") from None


# ---------------------------------------------------------------------------------------------
# 11. CORE evaluation (used by 04_core_eval)
# ---------------------------------------------------------------------------------------------
# The 22 tasks of the DCLM paper, scored as nanochat does. data/core.py writes each task into shards/core/<task>.bin,
# one sequence (BOS, context, continuation) per (example, choice), with <task>.records.bin, a row of
# CORE_RECORD_FIELDS per sequence, and tasks.json, the tasks' types and random baselines. A pass packs examples as
# prefix trees (CorePack): each shared context runs once, every choice attending as its sequence would alone.

CORE_RECORD_FIELDS = ("seq_start", "cont_start", "seq_end", "example", "choice", "gold")
CORE_MANIFEST = "tasks.json"


@dataclass
class CoreShard:
    label: str
    kind: str
    baseline: float  # random-guess accuracy in [0, 1]
    tokens: np.ndarray
    records: np.ndarray  # (sequences, len(CORE_RECORD_FIELDS)) int32


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of `seqs` (lists or arrays) share."""
    shortest = min(len(seq) for seq in seqs)
    heads = np.stack([np.asarray(seq[:shortest]) for seq in seqs])
    differs = (heads != heads[0]).any(axis=0)
    return int(differs.argmax()) if differs.any() else shortest


def read_core_shards(directory: Path, vocab_size: int | None = None) -> list[CoreShard]:
    manifest = require_artifact(Path(directory) / CORE_MANIFEST, made_by="02_sharding")
    paths = [(task, Path(directory) / f"{task['label']}.bin") for task in json.loads(manifest.read_text())]
    return [CoreShard(task["label"], task["kind"], task["baseline"], read_shard(path, vocab_size),
                      read_shard(side_file(path, "records"), kind="records")) for task, path in paths]


def core_examples(tokens: np.ndarray, records: np.ndarray, max_seq_len: int
                  ) -> Iterator[list[tuple[np.ndarray, int]]]:
    """Lazily, per example, per choice: its tokens and continuation start. An example over max_seq_len loses from the
    left of every choice what its longest is over (nanochat cuts each choice alone), so one context stays shared."""
    example_ids = records[:, CORE_RECORD_FIELDS.index("example")]
    for spans in np.split(records[:, :3].astype(np.int64), np.flatnonzero(np.diff(example_ids)) + 1):
        cut = max(0, int((spans[:, 2] - spans[:, 0]).max()) - max_seq_len) if len(spans) else 0
        choices = []
        for seq_start, cont_start, seq_end in spans.tolist():
            skip = min(cut, seq_end - seq_start - 2)  # less only for a choice far shorter than the longest
            choices.append((np.asarray(tokens[seq_start + skip:seq_end], dtype=np.int64),
                            max(cont_start - seq_start - skip, 1)))
        if choices:
            yield choices


def shared_prefix_length(choices: list[tuple[np.ndarray, int]]) -> int:
    """Input tokens (all but each sequence's last) that every choice of an example shares."""
    return common_prefix_length([seq[:-1] for seq, _ in choices])


def shared_prefix_cost(choices: list[tuple[np.ndarray, int]]) -> int:
    """Input tokens of an example packed as a prefix tree: the shared prefix once, then each choice's own rest."""
    shared = shared_prefix_length(choices)
    return shared + sum(len(seq) - 1 - shared for seq, _ in choices)


@dataclass
class CorePack:
    """Examples as prefix trees in one pass. Per token: its example (document; padding is one more), branch (0: the
    shared prefix; c + 1: choice c) and position in its choice. Per prediction: packed index, target, choice."""
    inputs: np.ndarray
    documents: np.ndarray
    branches: np.ndarray
    positions: np.ndarray
    scored: np.ndarray
    targets: np.ndarray
    owners: np.ndarray
    choices: int


def pack_core_examples(examples: Sequence[list[tuple[np.ndarray, int]]], pad_to: int = 1) -> CorePack:
    """Whole examples (core_examples) in one CorePack. A pack with branches (choices with input tokens of their own)
    is padded to a multiple of `pad_to` tokens, the one shape its flex passes compile for; plain documents are not."""
    pieces, scored, targets = [], [], []  # pieces: (tokens, document, branch, positions)
    offset = own_tokens = 0
    for document, choices in enumerate(examples):
        shared, prefix_offset = shared_prefix_length(choices), offset
        pieces.append((choices[0][0][:shared], document, 0, np.arange(shared)))
        offset += shared
        for branch, (seq, start) in enumerate(choices, 1):
            pieces.append((seq[shared:-1], document, branch, np.arange(shared, len(seq) - 1)))
            inputs = np.arange(start - 1, len(seq) - 1)  # the prediction of token t sits at input t - 1
            scored.append(np.where(inputs < shared, prefix_offset + inputs, offset + inputs - shared))
            targets.append(seq[start:])
            offset += len(seq) - 1 - shared
            own_tokens += len(seq) - 1 - shared
    padding = -offset % pad_to if own_tokens else 0
    pieces.append((np.zeros(padding, dtype=np.int64), len(examples), 0, np.zeros(padding, dtype=np.int64)))
    columns = [(tokens, np.full(len(tokens), document), np.full(len(tokens), branch), positions)
               for tokens, document, branch, positions in pieces]
    inputs, documents, branches, positions = (np.concatenate(column) for column in zip(*columns))
    owners = np.concatenate([np.full(len(t), i) for i, t in enumerate(targets)])
    return CorePack(inputs, documents, branches, positions, np.concatenate(scored), np.concatenate(targets), owners,
                    len(targets))


def _score_pack(model: GPT, pack: CorePack, backend: str, tree_backend: str, device: str) -> Tensor:
    """(mean continuation loss, 1 if greedy decoding reproduces it) per choice of one pass. Branches need a prefix-tree
    mask per window on `tree_backend`: a BlockMask on flex, the mask_mod on sdpa (dense, an example at a time)."""
    inputs, documents, branches, positions, scored, targets, owners = (
        host_to_device(array, device) for array in (pack.inputs, pack.documents, pack.branches, pack.positions,
                                                    pack.scored, pack.targets, pack.owners))
    starts = np.flatnonzero(np.diff(pack.documents)) + 1
    cu_seqlens = host_to_device(np.array([0, *starts, len(pack.inputs)], dtype=np.int32), device)
    windows = None
    if pack.branches.any():
        backend, masks = tree_backend, {}
        for window in set(model.layer_windows()):
            mask = shared_prefix_mask_mod(documents, branches, positions, window)
            masks[window] = build_block_mask(mask, len(documents), documents.device) if backend == "flex" else mask
        windows = [masks[window] for window in model.layer_windows()]
    logits = model(inputs, cu_seqlens, int(pack.positions.max()) + 1, backend=backend, windows=windows,
                   positions=positions, logit_rows=scored)
    losses = F.cross_entropy(logits, targets, reduction="none")
    misses = (logits.argmax(-1) != targets).float()
    sums = torch.zeros(pack.choices, 3, device=device)
    sums.index_add_(0, owners, torch.stack([losses, misses, torch.ones_like(losses)], 1))
    return torch.stack([sums[:, 0] / sums[:, 2], (sums[:, 1] == 0).float()], 1)


@torch.no_grad()
def score_core_records(model: GPT, tokens: np.ndarray, records: np.ndarray, backend: str, device: str,
                       pack_tokens: int = 0) -> np.ndarray:
    """(mean loss, exact) per record. pack_tokens=0 runs each choice alone on `backend`: the reference. Otherwise
    passes of up to `pack_tokens` tokens of whole examples; those with branches run on flex, padded to one shape, or
    on sdpa when `backend` is (uncompiled flex would build dense masks over whole passes), the others on `backend`."""
    examples = core_examples(tokens, records, model.config.max_seq_len)
    if pack_tokens == 0 or model.config.plain_documents_only:  # no prefix trees: each choice a document of its own
        examples = ([choice] for choices in examples for choice in choices)
    tree_backend = "sdpa" if backend == "sdpa" else "flex"  # for branches: a choice alone has none
    pad_to = -(-pack_tokens // FLEX_BLOCK_SIZE) * FLEX_BLOCK_SIZE if tree_backend == "flex" and pack_tokens else 1
    chunks = budget_chunks(examples, shared_prefix_cost, pack_tokens) if pack_tokens else ([e] for e in examples)
    scores = [_score_pack(model, pack_core_examples(chunk, pad_to), backend, tree_backend, device) for chunk in chunks]
    return torch.cat(scores).cpu().numpy() if scores else np.zeros((0, 2), dtype=np.float32)


def core_correct(kind: str, records: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per example (in order of first appearance): right or wrong. The lowest mean loss picks the choice (ties go
    to the first); a language-modelling example has one choice, right when reproduced exactly."""
    examples = records[:, CORE_RECORD_FIELDS.index("example")]
    gold = records[:, CORE_RECORD_FIELDS.index("gold")]
    _, first, group = np.unique(examples, return_index=True, return_inverse=True)
    if kind == "language_modeling":
        correct = scores[first, 1] == 1
    else:  # records sorted by example, then mean loss, then position: each example's first is its pick
        order = np.lexsort((np.arange(len(records)), scores[:, 0], group))
        correct = gold[order[np.flatnonzero(np.diff(group[order], prepend=-1))]] == 1
    return correct[np.argsort(first)]


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect: how CORE puts tasks of different chance levels on one scale."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core_task(model: GPT, shard: CoreShard, backend: str, device: str, pack_tokens: int = 0
                       ) -> dict[str, float]:
    """Accuracy of one task; under torch.distributed each rank scores the examples with index % world == rank."""
    world_size, rank = world_size_and_rank()
    mine = shard.records[shard.records[:, CORE_RECORD_FIELDS.index("example")] % world_size == rank]
    model.eval()
    scores = score_core_records(model, shard.tokens, mine, backend, device, pack_tokens)
    correct = core_correct(shard.kind, mine, scores)
    model.train()
    right, examples = sum_over_ranks([correct.sum(), len(correct)])
    accuracy = right / examples if examples else 0.0
    return {"accuracy": accuracy, "centered": centered_accuracy(accuracy, shard.baseline),
            "baseline": shard.baseline, "examples": int(examples)}


def evaluate_core(model: GPT, shards: Sequence[CoreShard], backend: str, device: str, pack_tokens: int = 0,
                  log: typing.Callable[[str], None] | None = None) -> dict[str, Any]:
    """Per-task results and CORE, the mean centred accuracy over the tasks given; `log` gets a line per task."""
    tasks = {}
    for shard in shards:
        started = time.time()
        tasks[shard.label] = evaluate_core_task(model, shard, backend, device, pack_tokens)
        if log:
            log(f"{shard.label}: accuracy {tasks[shard.label]['accuracy']:.3f} ({len(shard.records):,} sequences, "
                f"{len(shard.tokens):,} tokens) in {time.time() - started:.1f} s")
    core = float(np.mean([t["centered"] for t in tasks.values()])) if tasks else float("nan")
    return {"tasks": tasks, "core": core}


# ---------------------------------------------------------------------------------------------
# 12. Chat format, calculator and inference engine (used by 02_sharding, 05_sft, 06_rl, 07_chat)
# ---------------------------------------------------------------------------------------------
# A conversation is a list of messages {"role": "system"|"user"|"assistant", "content": ...}. User and system
# content is a string; assistant content is a string or a list of parts {"type": "text"|"python"|"python_output",
# "text": str}: prose, a calculator expression the model writes, and the result the engine forces back in.
# Rendered: <|bos|> <|user_start|>..<|user_end|> <|assistant_start|>..<|assistant_end|> ..., with the non-text
# parts between the tokens of CHAT_PART_TOKENS.

CHAT_PART_TOKENS = {"python": ("<|python_start|>", "<|python_end|>"),  # the tokens around each non-text part
                    "python_output": ("<|output_start|>", "<|output_end|>")}
CHAT_PART_TYPES = ("text", *CHAT_PART_TOKENS)


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: content must be a string, got {type(value).__name__}")
    return value


def _assistant_parts(content: Any, where: str) -> list[dict[str, str]]:
    """An assistant message's content as a list of parts (a plain string is one text part)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") not in CHAT_PART_TYPES:
            raise ValueError(f"{where}, part {j}: expected {{'type': one of {CHAT_PART_TYPES}, 'text': str}}, "
                             f"got {part!r}")
        _check_text(part.get("text"), f"{where}, part {j}")
    return content


def chat_turns(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A conversation's turns, the system message folded into the first user one; ValueError if the format cannot."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("a conversation is a non-empty list of {'role': ..., 'content': ...} messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {message!r}")
    system = None
    if messages[0]["role"] == "system":
        system = _check_text(messages[0]["content"], "message 0 (system)")
        messages = messages[1:]
        if not messages or messages[0]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
    turns = []
    for i, message in enumerate(messages, start=int(system is not None)):
        expected = ("user", "assistant")[len(turns) % 2]
        if message["role"] != expected:
            raise ValueError(f"message {i}: expected role {expected!r} (after an optional system message, roles "
                             f"alternate user, assistant, ...), got {message['role']!r}")
        where = f"message {i} ({expected})"
        if expected == "user":
            content = _check_text(message["content"], where)
            if system is not None and not turns:
                content = f"{system}\n\n{content}"
        else:
            content = _assistant_parts(message["content"], where)
        turns.append({"role": expected, "content": content})
    return turns


def render_conversation(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]], max_tokens: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and a mask, 1 on what the model learns to write: assistant text, python parts and
    <|assistant_end|>; 0 on <|bos|>, user turns, <|assistant_start|> and tool output, which the engine forces."""
    special = tokenizer.special_id
    wraps = {kind: ([special(start)], [special(end)]) for kind, (start, end) in CHAT_PART_TOKENS.items()}
    ids, mask = [tokenizer.bos_id], [0]

    def add(tokens: list[int], trained: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(trained)] * len(tokens))

    for turn in chat_turns(messages):
        if turn["role"] == "user":
            add([special("<|user_start|>"), *tokenizer.encode(turn["content"]), special("<|user_end|>")], False)
            continue
        add([special("<|assistant_start|>")], False)
        for part in turn["content"]:
            start, end = wraps.get(part["type"], ([], []))
            add([*start, *tokenizer.encode(part["text"]), *end], part["type"] != "python_output")
        add([special("<|assistant_end|>")], True)
    if max_tokens is not None:
        ids, mask = ids[:max_tokens], mask[:max_tokens]
    return ids, mask


def render_for_completion(tokenizer: Tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """The conversation to its last user message (a final assistant one is dropped), then <|assistant_start|>."""
    messages = list(messages)
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("render_for_completion needs a conversation that ends with a user message "
                         "(optionally followed by one assistant message, which is dropped)")
    ids, _ = render_conversation(tokenizer, messages)
    return [*ids, tokenizer.special_id("<|assistant_start|>")]


# The calculator tool. The model writes an expression such as `12 * 7 + 3` or `"strawberry".count("r")`; the
# engine evaluates it by walking its syntax tree with a whitelist (never eval/exec on model text), under limits
# on length, depth, exponent, integer size, string size and time, and forces the result back as text.

CALC_MAX_CHARS = 300  # longest expression accepted
CALC_MAX_DEPTH = 64  # deepest syntax tree (a chain of n additions is n deep)
CALC_MAX_INT_BITS = 4096  # largest integer, operand or result (about 1200 decimal digits)
CALC_MAX_STRING = 10_000  # longest string, operand or result
CALC_STRING_METHODS = frozenset({"count", "upper", "lower", "strip", "replace", "split", "find", "startswith",
                                 "endswith"})


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; calculate() returns its message."""


def _check_size(value: Any) -> Any:
    if type(value) not in (int, float, str, list, bool):
        raise CalculatorError(f"{type(value).__name__} result not supported")
    if isinstance(value, int) and value.bit_length() > CALC_MAX_INT_BITS:
        raise CalculatorError("number too large")
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("result is not finite")
    if isinstance(value, (str, list)) and (len(value) > CALC_MAX_STRING or sum(map(len, value)) > CALC_MAX_STRING):
        raise CalculatorError("result too long")
    return value


_CALC_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                   ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _calc_binary(op: ast.operator, left: Any, right: Any) -> Any:
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (left, right))
    if isinstance(op, ast.Add) and all(isinstance(x, str) for x in (left, right)):
        return left + right
    if isinstance(op, ast.Mult) and isinstance(left, str) != isinstance(right, str):
        text, count = (left, right) if isinstance(left, str) else (right, left)
        if not isinstance(count, int) or isinstance(count, bool) or len(text) * max(count, 0) > CALC_MAX_STRING:
            raise CalculatorError("string repeat too long")
        return text * count
    if not numbers:
        raise CalculatorError(f"unsupported operands for {type(op).__name__}")
    if isinstance(op, ast.Pow):
        if abs(right) > 1024 or (abs(left) > 1 and abs(right) * math.log2(abs(left)) > CALC_MAX_INT_BITS):
            raise CalculatorError("exponent too large")
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > CALC_MAX_INT_BITS:
            raise CalculatorError("number too large")
    if type(op) not in _CALC_OPERATORS:
        raise CalculatorError(f"operator {type(op).__name__} not allowed")
    return _CALC_OPERATORS[type(op)](left, right)


def _calc_call(node: ast.Call, evaluate: typing.Callable[[ast.AST], Any]) -> Any:
    if node.keywords:
        raise CalculatorError("keyword arguments not allowed")
    args = [evaluate(arg) for arg in node.args]
    if isinstance(node.func, ast.Name) and node.func.id == "len" and len(args) == 1:
        if not isinstance(args[0], (str, list)):
            raise CalculatorError("len() needs a string")
        return len(args[0])
    if not isinstance(node.func, ast.Attribute) or node.func.attr not in CALC_STRING_METHODS:
        raise CalculatorError(f"only len() and the string methods {sorted(CALC_STRING_METHODS)} may be called")
    target = evaluate(node.func.value)
    if not isinstance(target, str) or not all(isinstance(a, str) for a in args) or len(args) > 2:
        raise CalculatorError(f".{node.func.attr}() needs a string and at most two string arguments")
    if node.func.attr == "replace" and len(args) == 2 and (len(target) + 1) * (len(args[1]) + 1) > CALC_MAX_STRING:
        raise CalculatorError("result too long")
    return getattr(target, node.func.attr)(*args)


def _calc_eval(node: ast.AST, depth: int, deadline: float) -> Any:
    if depth > CALC_MAX_DEPTH:
        raise CalculatorError("expression nested too deeply")
    if time.monotonic() > deadline:
        raise CalculatorError("timed out")

    def evaluate(child: ast.AST) -> Any:
        return _calc_eval(child, depth + 1, deadline)

    if isinstance(node, ast.Expression):
        return evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        operand = evaluate(node.operand)
        if not isinstance(operand, (int, float)) or isinstance(operand, bool):
            raise CalculatorError("unary sign needs a number")
        return operand if isinstance(node.op, ast.UAdd) else -operand
    if isinstance(node, ast.BinOp):
        return _check_size(_calc_binary(node.op, evaluate(node.left), evaluate(node.right)))
    if isinstance(node, ast.Call):
        return _check_size(_calc_call(node, evaluate))
    raise CalculatorError(f"{type(node).__name__} not allowed")


def calculate(expression: str, timeout_s: float = 0.5) -> str:
    """A calculator expression's value as text (an integral float as an int), or "error: ...": never raises."""
    try:
        if len(expression) > CALC_MAX_CHARS:
            raise CalculatorError(f"expression longer than {CALC_MAX_CHARS} characters")
        value = _calc_eval(ast.parse(expression.strip(), mode="eval"), 0, time.monotonic() + timeout_s)
        if isinstance(value, float):
            return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.10g}"
        return str(value)
    except CalculatorError as error:
        return f"error: {error}"
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError, MemoryError, RecursionError) as error:
        return f"error: {type(error).__name__}"


# The inference engine: rows advance in lockstep, a token each per step through GPT.forward and their KVCache.

@torch.compiler.disable  # inductor's code generation for a cumulative sum over the vocabulary fails (torch 2.11)
def sample_tokens(logits: Tensor, uniforms: Tensor, temperature: float | Tensor = 1.0, top_k: int | None = None,
                  top_p: float | Tensor | None = None) -> Tensor:
    """One token per row of logits (B, vocab) by inverse transform of the row's own uniform, so rows depend on their
    own generators only. Temperature 0 is greedy; per-row tensors (B,) let a captured step read them from buffers."""
    if not isinstance(temperature, Tensor) and temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / (temperature[:, None] if isinstance(temperature, Tensor) else temperature)
    if top_k and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if isinstance(top_p, Tensor) or (top_p is not None and top_p < 1.0):
        cut = top_p[:, None] if isinstance(top_p, Tensor) else top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(dim=-1) - sorted_probs > cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)  # the top token is always kept
    cumulative = probs.cumsum(dim=-1)
    targets = uniforms.to(cumulative)[:, None] * cumulative[:, -1:]  # scaled: the cut rows no longer sum to 1
    return torch.searchsorted(cumulative, targets, right=True).squeeze(1).clamp_(max=logits.size(-1) - 1)


@dataclass(frozen=True)
class Sampling:
    """How every row of a generation picks its tokens. What changes the step's operations (greedy, top_k, whether
    top_p cuts) is fixed when a step is built; temperature and top_p values go to DecodeState's per-row buffers."""
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    @property
    def cuts_top_p(self) -> bool:
        return not self.greedy and self.top_p is not None and self.top_p < 1.0


@dataclass
class DecodeState:
    """The device buffers of a decode step (B rows, chunks of `chunk` steps); the host touches them once per chunk."""
    logits: Tensor  # (B, vocab) fp32: each row's next-token logits (the step samples them, then replaces them)
    temperature: Tensor  # (B,) fp32
    top_p: Tensor  # (B,) fp32
    uniforms: Tensor  # (B, chunk) fp32: each row's next uniforms, used one per sampled token
    draws: Tensor  # (B,) long: uniforms used in this chunk
    forced: Tensor  # (B, chunk) long: tokens the row must take next (tool output), in order
    forced_len: Tensor  # (B,) long: how many of them there are
    forced_at: Tensor  # (B,) long: how many of them the row took in this chunk
    emitted: Tensor  # (B, chunk) long: the token of each step of the chunk, -1 where the row was idle
    sampled: Tensor  # (B, chunk) bool: the token was sampled, not forced
    step: Tensor  # () long: steps run in this chunk
    left: Tensor  # (B,) long: tokens the row may still emit
    done: Tensor  # (B,) bool: the row emitted a stop token or its last allowed one
    waiting: Tensor  # (B,) bool: the row emitted <|python_end|>: idle until the host has answered the call
    stop_ids: Tensor  # (S,) long

    @classmethod
    def allocate(cls, rows: int, vocab_size: int, chunk: int, stop_ids: Sequence[int], device: torch.device
                 ) -> "DecodeState":
        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return cls(zeros(rows, vocab_size, dtype=torch.float32), zeros(rows, dtype=torch.float32),
                   zeros(rows, dtype=torch.float32), zeros(rows, chunk, dtype=torch.float32), zeros(rows),
                   zeros(rows, chunk), zeros(rows), zeros(rows), zeros(rows, chunk),
                   zeros(rows, chunk, dtype=torch.bool),
                   zeros(), zeros(rows), zeros(rows, dtype=torch.bool), zeros(rows, dtype=torch.bool),
                   torch.tensor(sorted(stop_ids), device=device))


def decode_step(model: GPT, cache: KVCache, state: DecodeState, backend: str, sampling: Sampling,
                python_end: int) -> None:
    """One token per row and the forward pass to the next logits, all on the device. Inactive rows feed a token too
    (fixed shapes) but record -1, keep their logits and stay put in the cache; <|python_end|> makes a row wait."""
    active = ~(state.done | state.waiting)
    last = state.uniforms.size(1) - 1
    uniform = state.uniforms.gather(1, state.draws.clamp(max=last)[:, None])[:, 0]
    temperature = 0.0 if sampling.greedy else state.temperature
    drawn = sample_tokens(state.logits, uniform, temperature, sampling.top_k,
                          state.top_p if sampling.cuts_top_p else None)
    forcing = state.forced_at < state.forced_len
    token = torch.where(forcing, state.forced.gather(1, state.forced_at.clamp(max=last)[:, None])[:, 0], drawn)
    column = state.step.expand(token.size(0), 1)
    state.emitted.scatter_(1, column, torch.where(active, token, -1)[:, None])
    state.sampled.scatter_(1, column, (active & ~forcing)[:, None])
    state.draws.add_(active & ~forcing)
    state.forced_at.add_(active & forcing)
    state.left.sub_(active.long())
    stops = (token[:, None] == state.stop_ids).any(dim=1) | (state.left == 0)
    state.done.logical_or_(active & stops)
    state.waiting.logical_or_(active & ~stops & (token == python_end))
    cache.advancing.copy_(active)
    logits = model(token[:, None], kv_cache=cache, backend=backend)[:, -1]
    state.logits.copy_(torch.where(active[:, None], logits, state.logits))
    state.step.add_(1)


@lru_cache(maxsize=None)
def _compiled_decode_step(compile_backend: str):
    """decode_step as one graph whose elementwise work inductor fuses. Default mode: max-autotune's matmul search
    costs minutes per shape for matrix-vector products cuBLAS runs at memory speed. Static shapes, as dynamic ones
    failed (baselines/2026-11-30-decode-graph): the engine rounds capacities up to DECODE_CAPACITY_STEP: few graphs."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(decode_step, backend=compile_backend, dynamic=False)


DECODE_CAPACITY_STEP = 256  # a compiled decode step's cache capacities are multiples of this (or max_seq_len)


@dataclass
class _RowState:
    """Where one row of a generation is, host side (DecodeState holds the device side)."""
    left: int  # tokens this row may still emit
    forced: list[int] = dataclasses.field(default_factory=list)  # tokens queued for forcing (a call's result)
    expression: list[int] | None = None  # tokens after <|python_start|>; None outside a tool call
    done: bool = False
    uniforms: list[float] = dataclasses.field(default_factory=list)  # drawn from the row's generator, not used yet


class DecodeStep:
    """decode_step over a cache and its DecodeState: each call emits one token per row with no host sync. On a GPU
    the step is a CUDA graph, so the GPU does not idle while the host queues small kernels; captured by hand, not by
    mode="reduce-overhead", as the buffers are fixed: a replay is one launch (no guards, input copies, re-recording)."""

    def __init__(self, model: GPT, cache: KVCache, backend: str, sampling: Sampling, stop_ids: Sequence[int],
                 python_end: int, chunk: int = 16, cuda_graph: bool = True, compile_backend: str | None = None):
        self.model, self.cache, self.backend = model, cache, backend
        self.sampling, self.python_end = sampling, python_end
        device = cache.k.device
        self.state = DecodeState.allocate(cache.batch_size, model.config.vocab_size, chunk, stop_ids, device)
        self.function = _compiled_decode_step(compile_backend) if compile_backend else decode_step
        self.graph = None
        if cuda_graph and device.type == "cuda":
            try:
                self.graph = self._capture()
            except RuntimeError as error:  # e.g. a backend that syncs with the host: fall back to uncaptured steps
                warnings.warn(f"decoding without a CUDA graph, its capture failed: {error}")

    @property
    def chunk(self) -> int:
        return self.state.uniforms.size(1)

    def _run(self) -> None:
        self.function(self.model, self.cache, self.state, self.backend, self.sampling, self.python_end)

    def _capture(self) -> torch.cuda.CUDAGraph:
        """Warm-up steps (which compile) run for real: the keys and values they write are overwritten by the first
        real step before any query reads them, and every other buffer they change is put back afterwards."""
        buffers = (*vars(self.state).values(), self.cache.lengths, *self.cache.carried.values())
        saved = [buffer.clone() for buffer in buffers]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up on a side stream before capture, as torch.cuda.graphs requires
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run()
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)
        return graph

    def start(self, logits: Tensor, limits: Sequence[int]) -> None:
        """A generation begins: each row's first logits (B, vocab) and how many tokens it may emit."""
        state = self.state
        state.logits.copy_(logits)
        state.left.copy_(torch.tensor(list(limits)))
        state.temperature.fill_(max(self.sampling.temperature, 1e-6))
        state.top_p.fill_(self.sampling.top_p or 1.0)
        state.done.zero_()

    def begin_chunk(self, uniforms: Tensor, forced: Tensor, forced_len: Tensor) -> None:
        """Host inputs of the next chunk, (B, chunk), (B, chunk) and (B,) on the host: every waiting row resumes."""
        state = self.state
        for buffer, value in ((state.uniforms, uniforms), (state.forced, forced), (state.forced_len, forced_len)):
            buffer.copy_(value, non_blocking=True)
        for buffer in (state.draws, state.forced_at, state.step, state.waiting):
            buffer.zero_()
        state.emitted.fill_(-1)

    def __call__(self) -> None:
        (self._run if self.graph is None else self.graph.replay)()

    def read_chunk(self) -> tuple[list[list[int]], list[list[bool]], list[int], list[int]]:
        """Per row: the chunk's tokens (-1 where idle), which were sampled, uniforms used, forced tokens taken."""
        state, chunk = self.state, self.chunk
        packed = torch.cat([state.emitted, state.sampled.long(), state.draws[:, None], state.forced_at[:, None]], 1)
        rows = packed.tolist()
        return ([row[:chunk] for row in rows], [[bool(s) for s in row[chunk:2 * chunk]] for row in rows],
                [row[-2] for row in rows], [row[-1] for row in rows])


class Engine:
    """KV-cache generation with the calculator tool. Prompts are prefilled together in packed passes (PackedPrompts)
    into their num_samples rows each; then every row advances a token a step until <|assistant_end|> or <|bos|>
    (kept) or max_tokens. A row that closes <|python_start|> expression <|python_end|> waits, masked, to the end of
    its chunk of `sync_every` device steps (DecodeStep); then the host forces <|output_start|> result <|output_end|>."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, backend: str = "sdpa", cuda_graph: bool = True,
                 graph_min_tokens: int = 32, compile_backend: str | None = None, sync_every: int = 16,
                 prefill_tokens: int = 32768):
        for name, value in (("sync_every", sync_every), ("prefill_tokens", prefill_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.model, self.tokenizer, self.backend = model, tokenizer, backend
        self.cuda_graph, self.graph_min_tokens, self.compile_backend = cuda_graph, graph_min_tokens, compile_backend
        self.sync_every, self.prefill_tokens = sync_every, prefill_tokens
        special = tokenizer.special_id
        self.stop_ids = {special("<|assistant_end|>"), tokenizer.bos_id}
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def _observe(self, row: _RowState, token: int) -> None:
        """Update a row after it took `token`: finish it, or follow and answer a tool call."""
        row.left -= 1
        if token in self.stop_ids or row.left == 0:
            row.done = True
        elif token == self.python_start:
            row.expression = []
        elif token == self.python_end and row.expression is not None:
            result = calculate(self.tokenizer.decode(row.expression))
            row.forced += [self.output_start, *self.tokenizer.encode(result), self.output_end]
            row.expression = None
        elif row.expression is not None:
            row.expression.append(token)

    def _prefill(self, prompts: Sequence[Sequence[int]], num_samples: int, max_tokens: int
                 ) -> tuple[KVCache, Tensor, list[int]]:
        """The cache, each prompt prefilled into its rows, each row's first logits (B, vocab) and token limit."""
        model, device = self.model, self.model.rotary_cos.device
        limits = [min(max_tokens, model.config.max_seq_len - len(prompt)) for prompt in prompts]
        capacity = max(len(prompt) + limit for prompt, limit in zip(prompts, limits))
        if self.compile_backend:  # one compiled graph per capacity: round up so that few capacities occur
            capacity = min(-(-capacity // DECODE_CAPACITY_STEP) * DECODE_CAPACITY_STEP, model.config.max_seq_len)
        cache = KVCache(model.config, len(prompts) * num_samples, capacity, device, model.compute_dtype)
        logits = torch.empty(len(prompts), model.config.vocab_size, device=device)
        for group in token_budget_chunks([len(prompt) for prompt in prompts], self.prefill_tokens):
            packed = PackedPrompts(cache, [len(prompts[i]) for i in group], [i * num_samples for i in group],
                                   num_samples)
            ids = torch.tensor([token for i in group for token in prompts[i]], device=device)
            logits[group] = model(ids, kv_cache=packed, backend=self.backend, logit_rows=packed.last_tokens())
        row_limits = [limit for limit in limits for _ in range(num_samples)]
        return cache, logits.repeat_interleave(num_samples, dim=0), row_limits

    def check_arguments(self, prompts: Sequence[Sequence[int]], num_samples: int, max_tokens: int,
                        temperature: float, top_k: int | None, top_p: float | None) -> None:
        """ValueError, naming the argument, for what generation cannot take; max_tokens is cut to the context's room."""
        def is_int(value: Any) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)

        for name, value in (("num_samples", num_samples), ("max_tokens", max_tokens)):
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if top_k is not None and (not is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k must be None (no cut) or an integer >= 1, got {top_k!r}")
        if not is_number(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
        if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None (no cut) or a number in (0, 1], got {top_p!r}")
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of token id lists, got {prompts!r:.80}")
        vocab_size, context = self.model.config.vocab_size, self.model.config.max_seq_len
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
                raise ValueError(f"prompt {i} must be a list of token ids, got {prompt!r:.80}")
            if not prompt:
                raise ValueError(f"prompt {i} is empty: start it with <|bos|> (see render_for_completion)")
            bad = [token for token in prompt if not is_int(token) or not 0 <= token < vocab_size]
            if bad:
                raise ValueError(f"prompt {i} holds {bad[0]!r}, not a token id of the model's vocabulary "
                                 f"(0..{vocab_size - 1})")
            if len(prompt) >= context:
                raise ValueError(f"prompt {i} of {len(prompt)} tokens leaves no room to generate in the model's "
                                 f"context (max_seq_len {context})")

    def stream_batch(self, prompts: Sequence[Sequence[int]], num_samples: int = 1, max_tokens: int = 256,
                     temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0
                     ) -> Iterator[tuple[list[int], list[int]]]:
        """Yield, each step, every row's new token (-1 while finished or waiting) and 1 if sampled, 0 if forced. Row r
        continues prompts[r // num_samples] seeded seed + r, as a single sample would; bad arguments raise at once."""
        self.check_arguments(prompts, num_samples, max_tokens, temperature, top_k, top_p)
        return self._decode(prompts, num_samples, max_tokens, Sampling(temperature, top_k, top_p), seed)

    @staticmethod
    def _chunk_inputs(rows: list[_RowState], generators: list[random.Random], chunk: int, greedy: bool
                      ) -> tuple[Tensor, Tensor, Tensor]:
        """DecodeStep.begin_chunk's inputs; unused uniforms stay queued: a row's k-th sample takes its k-th draw."""
        uniforms = torch.zeros(len(rows), chunk)
        forced = torch.zeros(len(rows), chunk, dtype=torch.long)
        forced_len = torch.zeros(len(rows), dtype=torch.long)
        for r, row in enumerate(rows):
            if not greedy:
                row.uniforms += [generators[r].random() for _ in range(chunk - len(row.uniforms))]
                uniforms[r] = torch.tensor(row.uniforms)
            queued = row.forced[:chunk]
            forced[r, :len(queued)] = torch.tensor(queued, dtype=torch.long)
            forced_len[r] = len(queued)
        return uniforms, forced, forced_len

    @torch.inference_mode()
    def _decode(self, prompts: Sequence[Sequence[int]], num_samples: int, max_tokens: int, sampling: Sampling,
                seed: int) -> Iterator[tuple[list[int], list[int]]]:
        cache, logits, limits = self._prefill(prompts, num_samples, max_tokens)
        chunk = min(self.sync_every, max(limits))
        step = DecodeStep(self.model, cache, self.backend, sampling, sorted(self.stop_ids), self.python_end, chunk,
                          self.cuda_graph and max(limits) >= self.graph_min_tokens, self.compile_backend)
        step.start(logits, limits)
        generators = [random.Random(seed + r) for r in range(len(limits))]
        rows = [_RowState(limit) for limit in limits]
        while True:
            step.begin_chunk(*self._chunk_inputs(rows, generators, chunk, sampling.greedy))
            for _ in range(min(chunk, max(row.left for row in rows if not row.done))):
                step()
            emitted, sampled, draws, taken = step.read_chunk()
            for row, used, took in zip(rows, draws, taken):
                del row.uniforms[:used], row.forced[:took]
            for tokens, flags in zip(zip(*emitted), zip(*sampled)):  # the chunk's steps, each over every row
                if all(token < 0 for token in tokens):
                    continue
                for row, token in zip(rows, tokens):
                    if token >= 0:
                        self._observe(row, token)
                yield list(tokens), [int(flag) for flag in flags]
            if all(row.done for row in rows):
                return

    def stream(self, prompt: Sequence[int], *args: Any, **kwargs: Any) -> Iterator[tuple[list[int], list[int]]]:
        """stream_batch of one prompt, with its other arguments: row i is sample i, seeded with seed + i."""
        return self.stream_batch([prompt], *args, **kwargs)

    def generate_batch(self, prompts: Sequence[Sequence[int]], *args: Any, **kwargs: Any
                       ) -> tuple[list[list[int]], list[list[int]]]:
        """stream_batch's rows gathered: each row's tokens (its stop token too) and a mask, 1 where sampled (RL's)."""
        steps = [list(zip(tokens, sampled)) for tokens, sampled in self.stream_batch(prompts, *args, **kwargs)]
        rows = [[step for step in row if step[0] >= 0] for row in zip(*steps)]  # each row's (token, sampled) pairs
        return [[token for token, _ in row] for row in rows], [[sampled for _, sampled in row] for row in rows]

    def generate(self, prompt: Sequence[int], *args: Any, **kwargs: Any) -> tuple[list[list[int]], list[list[int]]]:
        """generate_batch of one prompt, with its other arguments: the tokens and masks of its num_samples samples."""
        return self.generate_batch([prompt], *args, **kwargs)


# A reply back into message parts, and as text: the chat evals check it; 07_chat (notebooks/chat_session.py) shows it.

def assistant_parts(tokenizer: Tokenizer, ids: Sequence[int]) -> list[dict[str, str]]:
    """Generated tokens (after <|assistant_start|>) to message parts, up to a stop token; an open part is kept."""
    special = {tokenizer.special_id(name): name for name in SPECIAL_TOKENS}
    opens = {start: kind for kind, (start, _) in CHAT_PART_TOKENS.items()}
    closes = {end for _, end in CHAT_PART_TOKENS.values()}
    parts: list[tuple[str, list[int]]] = [("text", [])]
    for token in ids:
        name = special.get(token)
        if name in ("<|assistant_end|>", "<|bos|>"):
            break
        if name in opens:
            parts.append((opens[name], []))
        elif name in closes:
            parts.append(("text", []))
        elif name is None:
            parts[-1][1].append(token)
    return [{"type": kind, "text": tokenizer.decode(part)} for kind, part in parts if part or kind != "text"]


def show_parts(parts: Sequence[dict[str, str]]) -> str:
    """An assistant reply as plain text, with tool calls shown as [calculator: expression = result]."""
    templates = {"text": "{}", "python": "[calculator: {}", "python_output": " = {}]"}
    return "".join(templates[part["type"]].format(part["text"]) for part in parts)


# ---------------------------------------------------------------------------------------------
# 13. Supervised fine-tuning: the SFT loader (used by 05_sft)
# ---------------------------------------------------------------------------------------------
# 02_sharding renders the SFT mixture (data/sft.py) into shards/sft/{train,val}_*.bin: whole conversations back to
# back, each from <|bos|>, beside a loss mask (name.mask.bin, a uint8 per token, 1 on what the assistant writes);
# targets are -1 where it is 0. 05_sft's step and loss are notebooks/sft.py's, its chat evals data/chat_eval.py's.

class SFTLoader:
    """Endless rows of whole conversations of a seeded per-epoch shuffle, at most `tokens` tokens, none across epochs.
    Every rank walks the same rows and keeps every world_size-th: one global batch, resumable under any world size."""
    position_shared = True

    def __init__(self, shard_dir: Path, split: str, tokens: int, bos_id: int, vocab_size: int, max_seq_len: int,
                 rank: int = 0, world_size: int = 1, device: str = "cpu", seed: int = 0, shuffle: bool = True):
        if tokens < max_seq_len:
            raise ConfigError(f"micro_tokens={tokens} is less than the model's context ({max_seq_len} tokens), "
                              f"which a conversation may fill: pass --micro_tokens={max_seq_len} or more")
        self.tokens, self.rank, self.world_size = tokens, rank, world_size
        self.device, self.seed, self.shuffle = device, seed, shuffle
        self.shards, self.masks, spans = [], [], []
        for path in list_shards(shard_dir, split):
            ids, mask = read_shard(path, vocab_size), read_shard(side_file(path, "mask"), kind="mask")
            if len(mask) != len(ids) or (len(mask) and int(mask.max()) > 1):
                raise ShardError(f"{side_file(path, 'mask')}: {len(mask)} mask values (one 0 or 1 per token, "
                                 f"largest {int(mask.max(initial=0))}) for {len(ids)} tokens")
            starts = np.flatnonzero(np.asarray(ids) == bos_id)
            ends = np.append(starts[1:], len(ids))
            spans.append(np.stack([np.full(len(starts), len(self.shards)), starts,
                                   np.minimum(ends, starts + max_seq_len + 1)], 1))
            self.shards.append(ids)
            self.masks.append(mask)
        spans_all = np.concatenate(spans)
        self.spans = spans_all[spans_all[:, 2] - spans_all[:, 1] >= 2]  # at least one input and one target
        if not len(self.spans):
            raise ShardError(f"{shard_dir}: no '{split}' conversation of at least two tokens")
        self.position = {"epoch": 0, "cursor": 0}
        self._order = (-1, self.spans[:0, 0])  # (epoch, order): the order of the epoch in progress

    def order(self, epoch: int) -> np.ndarray:
        """The conversations (indices into spans) in the order of `epoch`, the same on every rank."""
        if self._order[0] != epoch:
            count = len(self.spans)
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(count) if self.shuffle
                           else np.arange(count))
        return self._order[1]

    def _next_row(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The inputs and targets of the conversations packed into the next row."""
        inputs, targets, used = [], [], 0
        while True:
            order = self.order(self.position["epoch"])
            shard, start, end = self.spans[order[self.position["cursor"]]]
            if inputs and used + end - start - 1 > self.tokens:  # the next conversation starts a new row
                return inputs, targets
            ids = np.asarray(self.shards[shard][start:end], dtype=np.int64)
            mask = np.asarray(self.masks[shard][start + 1:end])
            inputs.append(ids[:-1])
            targets.append(np.where(mask == 1, ids[1:], -1))
            used += end - start - 1
            self.position["cursor"] += 1
            if self.position["cursor"] == len(order):  # an epoch's last row may be short; the next starts afresh
                self.position = {"epoch": self.position["epoch"] + 1, "cursor": 0}
                return inputs, targets

    def next_batch(self) -> Batch:
        inputs, targets = [self._next_row() for _ in range(self.world_size)][self.rank]
        cu_seqlens = np.cumsum([0, *map(len, inputs)]).astype(np.int32)
        return Batch.on_device(np.concatenate(inputs), np.concatenate(targets), cu_seqlens, self.device)

    def state_dict(self) -> dict[str, int]:
        return dict(self.position)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = dict(state)


if __name__ == "__main__":  # `python3 stackcore.py pipeline`, the README's command: notebooks/pipeline.py
    from notebooks.pipeline import main

    main(sys.argv[1:])
