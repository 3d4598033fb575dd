# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Train your own tokenizer
#
# A language model never sees characters: it sees token ids. In this notebook you train a **byte-level BPE**
# (byte-pair encoding) tokenizer on a slice of the pretraining corpus, the same kind GPT-2 and GPT-4 use, but with
# a vocabulary you choose. It is the first artifact of your stack: every later notebook reads it.
#
# What happens, step by step:
# 1. set up: find the project, pick the preset (sizes for your hardware) and read any overrides;
# 2. get a slice of the corpus (ClimbMix from the Hugging Face Hub by default; local files or a synthetic corpus
#    in the `tiny` preset);
# 3. train BPE with `rustbpe` and save it in tiktoken's format, with the table of bytes per token;
# 4. look at how it splits text, and compare its compression with GPT-2's and GPT-4's tokenizers.
#
# Run it top to bottom. The same file runs headless: `python notebooks/01_tokenizer.py --vocab_size=65536`.

# %% [markdown]
# ## Get the runtime ready
# This cell runs first in every notebook. It finds the project (the checkout you run in or, in a fresh Google Colab
# runtime, a clone in `/content/decoderstack`), puts it on `sys.path` and calls `setup_runtime()` from
# `notebooks/runtime.py`, then imports `stackcore`. In Colab, `setup_runtime` first installs what `requirements.txt`
# asks for and the runtime lacks (never torch); anywhere it prints the GPU, its memory, the preset and the compute
# dtype, and elsewhere it installs nothing. In Colab, tick **use_drive** to keep `STACK_HOME` (every artifact) on
# Google Drive: each Colab notebook runs on its own machine, so Drive is how the next notebook finds what this one
# makes, and how artifacts survive a restart. Google asks for access once.

# %%
import os
import subprocess
import sys

use_drive = False  # @param {type:"boolean"}
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..") if "__file__" in globals()  # a twin: anywhere
                       else ".." if os.path.basename(os.getcwd()) == "notebooks" else ".")
if not os.path.isfile(os.path.join(ROOT, "stackcore.py")):  # not in a checkout: a fresh Colab runtime
    ROOT = "/content/decoderstack"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/decoderstack/decoderstack", ROOT], check=True)
sys.path.insert(0, ROOT)
from notebooks.runtime import setup_runtime

setup_runtime(use_drive)  # installs what a Colab runtime lacks, so stackcore is imported after it
import stackcore as sc

# %% [markdown]
# ## Set-up
# `stackcore.py` is the project's one shared module. The config below is a dataclass built by `configure` from
# `notebooks/config.py`: its defaults, then the preset's values, then `STACK_*` environment variables, then
# `--key=value` arguments (only when run as a script) decide each setting.

# %%
import json
import time
from dataclasses import dataclass
from typing import Callable

import matplotlib.pyplot as plt

from data.pretrain import CorpusConfig, iter_documents
from data.tokenizing import reference_encoding
from notebooks.config import above, configure, describe_config


@dataclass
class TokenizerConfig(CorpusConfig):
    vocab_size: int = 32768  # special tokens included
    max_chars: int = 2_000_000_000  # characters of training text fed to BPE (nanochat uses 2 B)
    heldout_docs: int = 200  # validation documents used to measure compression
    PRESETS = {"tiny": dict(vocab_size=512, max_chars=2_000_000), "colab": dict(max_chars=500_000_000)}
    LIMITS = {"vocab_size": above(256 + len(sc.SPECIAL_TOKENS), 2**32), "max_chars": above(0),
              "heldout_docs": above(0)}


cfg = configure(TokenizerConfig)
print(describe_config(cfg))
out_dir = sc.artifact_dir("tokenizer")
run_dir = sc.artifact_dir("runs") / "01_tokenizer"
run_dir.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The corpus
# Hub corpora are sets of parquet shards; the last shard is the validation split. Only the shards you ask for
# are downloaded (into `STACK_HOME/downloads`, kept for next time). The `tiny` preset uses a synthetic corpus
# generated on the spot, so it needs no network.

# %%
files = cfg.resolve()
print(f"corpus: {cfg.corpus}: {len(files.train)} training files, {len(files.val)} validation files"
      if not files.synthetic else "corpus: synthetic (generated, offline)")

# %% [markdown]
# ## Train BPE
# BPE starts from the 256 byte values and repeatedly merges the most frequent adjacent pair into a new token,
# until the vocabulary is full. Text is first split with a regular expression (GPT-4's, with numbers cut into
# runs of at most two digits), so merges never cross word boundaries. Nine special tokens are reserved at the end
# of the vocabulary: `<|bos|>` starts every document; the others mark chat turns and tool calls for later notebooks.

# %%
chars_seen = 0


def training_text():
    global chars_seen
    for doc in iter_documents(files, "train", cfg.max_chars):
        chars_seen += len(doc)
        yield doc


t0 = time.time()
tokenizer = sc.Tokenizer.train(training_text(), cfg.vocab_size)
train_seconds = time.time() - t0
ranks_file = out_dir / sc.TOKENIZER_RANKS
previous_ranks = ranks_file.read_bytes() if ranks_file.exists() else None
tokenizer.save(out_dir)
print(f"trained a {tokenizer.vocab_size}-token vocabulary on {chars_seen / 1e6:.1f} M characters "
      f"in {train_seconds:.1f} s; saved to {out_dir}")
if previous_ranks not in (None, ranks_file.read_bytes()):
    print(f"note: this replaced another tokenizer in {out_dir}; the shards and checkpoints made with that one no "
          f"longer match it: run 02_sharding again and start new runs (or give each vocabulary its own STACK_HOME)")

# %% [markdown]
# ## Look inside: the first merges, learned on one sentence
# The same trainer on a single sentence shows what BPE does. Tokens 0-255 are the bytes; every token after that is
# one merge: the most frequent adjacent pair of tokens in the text so far (counted inside the pieces the split
# pattern cuts, never across them) becomes a new token, and every occurrence of the pair is replaced by it. Repeated
# pieces such as `at` and ` the` earn their tokens first. Below, each merge with the two tokens it joins.

# %%
# NBVAL_CHECK_OUTPUT
# (the output is the same on every machine: the tests compare it with the saved one)
sentence = "the cat sat on the mat, and the cat ate the rat that sat on the hat."
toy = sc.Tokenizer.train([sentence], 256 + len(sc.SPECIAL_TOKENS) + 12)
merges = sorted((rank, piece) for piece, rank in toy.ranks.items() if rank >= 256)
print(f"{'rank':>4}  {'left':>8} + {'right':<8} -> token")
for rank, piece in merges:
    left, right = next((piece[:i], piece[i:]) for i in range(1, len(piece))
                       if toy.ranks.get(piece[:i], rank) < rank and toy.ranks.get(piece[i:], rank) < rank)
    print(f"{rank:>4}  {left.decode()!r:>8} + {right.decode()!r:<8} -> {piece.decode()!r}")
toy_ids = toy.encode(sentence)
print(f"the sentence: {len(sentence.encode())} bytes -> {len(toy_ids)} tokens:",
      " | ".join(toy.decode([i]) for i in toy_ids))

# %% [markdown]
# ## What the tokens look like
# Split into its tokens, a sentence shows which pieces earned a token of their own. Special-token strings typed into plain
# text are encoded as ordinary text, never as the special token, so no document can forge a chat turn. Pieces
# of a character that spans several tokens print as `\\x..` bytes.

# %%
sample = "The tokenizer's 12345 merges: ‘déjà vu’ and 日本語 🤖 <|bos|>"
ids = tokenizer.encode(sample)
pieces = [tokenizer.enc.decode_single_token_bytes(i).decode("utf-8", "backslashreplace") for i in ids]
print(len(ids), "tokens:", " | ".join(pieces))
assert tokenizer.decode(ids) == sample and tokenizer.bos_id not in ids
print("special tokens:", tokenizer.specials)

# %% [markdown]
# ## Compression on held-out text
# Bytes per token measures compression: more bytes per token means shorter sequences, so cheaper training and
# longer effective context. We compare on validation documents the tokenizer never saw. GPT-2's and GPT-4's
# encodings come from tiktoken, which downloads them once; offline (or with no answer in 30 s), the comparison
# says so and shows ours alone.
# Tokenizing speed matters too: it is the cost of the next notebook.

# %%
heldout = [doc for _, doc in zip(range(cfg.heldout_docs), iter_documents(files, "val"))]
heldout_bytes = sum(len(d.encode("utf-8")) for d in heldout)
t0 = time.time()
tokenizer.encode_batch(heldout)
throughput = heldout_bytes / (time.time() - t0) / 1e6


def bytes_per_token(encode: Callable[[str], list[int]]) -> float:
    """Compression of a tokenizer on the held-out text: UTF-8 bytes over tokens (higher is better)."""
    return heldout_bytes / max(sum(len(encode(doc)) for doc in heldout), 1)


compression = {f"ours ({tokenizer.vocab_size})": bytes_per_token(tokenizer.encode)}
for name in ("gpt2", "cl100k_base"):
    try:
        reference = reference_encoding(name)
        compression[f"{name} ({reference.n_vocab})"] = bytes_per_token(reference.encode_ordinary)
    except Exception as error:  # no network (or no answer), no cached encoding file
        print(f"{name}: not available here ({type(error).__name__}); comparing ours alone")
for name, value in compression.items():
    print(f"{name:>24}: {value:.3f} bytes/token")
print(f"encoding speed: {throughput:.1f} MB/s on {len(heldout)} held-out documents ({heldout_bytes / 1e6:.2f} MB)")

bars = {**compression, "UTF-8 bytes, no merges (256)": 1.0}  # where BPE starts: one token per byte
fig, ax = plt.subplots(figsize=(7, 3))
ax.barh(list(bars), list(bars.values()), color=["tab:blue"] * len(compression) + ["tab:gray"])
ax.set(xlabel="bytes per token on held-out text (higher compresses better)",
       title=f"compression of {len(heldout)} held-out {'synthetic ' * files.synthetic}documents")
fig.tight_layout()
fig.savefig(run_dir / "compression.png", dpi=120)
plt.show()

# %% [markdown]
# ## Look inside: bytes per token as the vocabulary grows
# Each merge shortens the text a little, and the first merges (the most frequent pairs) shorten it most. Small
# tokenizers trained on a slice of the same training text, measured on the same held-out documents, show the curve:
# steep at first, then flatter, so doubling a large vocabulary buys less compression while the embedding table and
# the output layer grow with it. A vocabulary the slice cannot fill is left out.

# %%
slice_docs = list(iter_documents(files, "train", 1_000_000))
vocab_curve = {}
for size in (300, 400, 512, 1024, 2048, 4096):
    try:
        small = sc.Tokenizer.train(slice_docs, size)
    except ValueError:  # the slice supports fewer merges than this size asks for
        print(f"vocabulary {size:>5}: left out, more merges than the slice supports")
        continue
    vocab_curve[size] = bytes_per_token(small.encode)
    print(f"vocabulary {size:>5}: {vocab_curve[size]:.3f} bytes/token")

fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(list(vocab_curve), list(vocab_curve.values()), marker="o", label="trained on a 1 M-character slice")
ax.scatter([tokenizer.vocab_size], [compression[f"ours ({tokenizer.vocab_size})"]], color="tab:red", zorder=3,
           label=f"ours, trained above on {chars_seen / 1e6:.0f} M characters")
ax.set(xscale="log", xlabel="vocabulary size", ylabel="bytes per token (held-out)", title="compression against vocabulary")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(run_dir / "vocab_curve.png", dpi=120)
plt.show()

# %% [markdown]
# ## Summary
# The tokenizer lives in `STACK_HOME/tokenizer`: `tokenizer.tiktoken` (tiktoken's rank file) and `tokenizer.json`
# (split pattern and special tokens). From the ranks, `tokenizer.token_bytes()` gives the bytes of each token id (0
# for special tokens), which turns a loss in nats per token into bits per byte, a figure that compares across
# vocabularies.
# Next: `02_sharding` turns the corpus into token shards with it.

# %%
summary = {"vocab_size": tokenizer.vocab_size, "train_chars": chars_seen, "train_seconds": round(train_seconds, 2),
           "bytes_per_token": compression, "encode_MB_per_s": round(throughput, 2)}
(run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
