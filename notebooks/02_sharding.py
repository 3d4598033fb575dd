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
# # 02 · Pre-tokenize the data into shards
#
# Training should never wait for tokenization. Like modded-nanogpt, we tokenize the corpus once, up front, into
# **shards**: flat binary files of token ids that the training loop memory-maps and slices at no cost.
#
# Steps:
# 1. set up and load the tokenizer from `01_tokenizer`;
# 2. either download shards someone already made (a Hugging Face dataset repo), or tokenize the corpus yourself
#    with several processes, each document prefixed by `<|bos|>`;
# 3. look at what was written;
# 4. render and tokenize the CORE evaluation tasks for `04_core_eval`;
# 5. optionally push your shards to the Hub so your next Colab session can download them instead.
#
# Headless: `python notebooks/02_sharding.py --shard_tokens=50000000`.

# %% [markdown]
# ## Set-up
# The corpus settings are the ones `01_tokenizer` used (the same `CorpusConfig`), so both read the same documents.

# %%
import os
import sys

ROOT = os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else ".")
sys.path.insert(0, ROOT)

import json
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

import stackcore as sc
from data import core
from data.hub import pull_shards, push_shards
from data.pretrain import CorpusConfig, iter_documents


@dataclass
class ShardingConfig(CorpusConfig):
    max_chars: int = 0  # characters of training text to tokenize (0: all the downloaded shards)
    shard_tokens: int = 100_000_000  # tokens per shard file (modded-nanogpt's size)
    val_docs: int = 2000  # validation documents to tokenize
    workers: int = 0  # tokenizing processes (0: one per CPU core)
    pretokenized_repo: str = ""  # a hub dataset repo with ready shards: download instead of tokenizing
    push_repo: str = ""  # a hub dataset repo to upload the shards to when done (needs a write token)
    core_bundle: str = ""  # a local CORE eval bundle folder (empty: download it; the tiny preset generates one)
    core_max_examples: int = 0  # examples per CORE task (0: all)
    PRESETS = {"tiny": dict(shard_tokens=200_000, val_docs=100, workers=2, core_max_examples=8),
               "colab": dict(shard_tokens=50_000_000)}


cfg = sc.configure(ShardingConfig)
print(sc.describe_config(cfg))
shard_dir = sc.artifact_dir("shards") / "pretrain"
run_dir = sc.artifact_dir("runs") / "02_sharding"
run_dir.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Option A: download ready-made shards
# If `pretokenized_repo` is set, the tokenizer and shards come from that dataset repo and replace your own
# tokenizer (shards only make sense with the tokenizer that wrote them). Leave it empty to tokenize yourself.

# %%
if cfg.pretokenized_repo:
    pull_shards(cfg.pretokenized_repo, sc.stack_home())
    print(f"downloaded {cfg.pretokenized_repo} into {sc.stack_home()}")
tokenizer_dir = sc.artifact_dir("tokenizer")
tokenizer = sc.Tokenizer.load(tokenizer_dir)
print(f"tokenizer: {tokenizer.vocab_size} tokens, BOS id {tokenizer.bos_id}")

# %% [markdown]
# ## Option B: tokenize the corpus
# Each worker process loads the tokenizer once and encodes batches of documents; results come back in order, so
# the shards are the same on every run. A document never straddles two shards, and each starts with `<|bos|>`:
# that is what lets the loader of `03_pretrain` cut the stream into whole documents. Validation documents come
# from the corpus's validation split and go to `val_*.bin`.

# %%
def write_split(split: str, docs, total: int | None) -> list[tuple]:
    writer = sc.ShardWriter(shard_dir, split, cfg.shard_tokens, tokenizer.vocab_size)
    workers = cfg.workers or os.cpu_count() or 1
    for ids in tqdm(sc.tokenize_parallel(tokenizer_dir, docs, workers), total=total, desc=split, unit="doc"):
        writer.add(ids)
    writer.flush()
    return writer.written


if not cfg.pretokenized_repo:
    for old in shard_dir.glob("*.bin"):
        old.unlink()  # a smaller re-run must not leave stale shards of a larger one behind
    files = cfg.resolve()
    t0 = time.time()
    written = {"train": write_split("train", iter_documents(files, "train", cfg.max_chars), None)}
    train_seconds = time.time() - t0
    val_docs = [doc for _, doc in zip(range(cfg.val_docs), iter_documents(files, "val"))]
    written["val"] = write_split("val", val_docs, len(val_docs))
    train_tokens = sum(tokens for _, tokens, _ in written["train"])
    print(f"tokenized {train_tokens / 1e6:.2f} M training tokens in {train_seconds:.1f} s")

# %% [markdown]
# ## What was written
# Every shard is re-opened through the same reader the training loop uses: it checks the header, the file size
# and that every id fits the vocabulary. The plot shows tokens per shard and the document-length distribution,
# which decides how much a training sequence is cut into separate documents.

# %%
report = {}
doc_lengths = []
for split in ("train", "val"):
    paths = sc.list_shards(shard_dir, split)
    shards = [sc.read_shard(p, tokenizer.vocab_size) for p in paths]
    docs = sum(int((s == tokenizer.bos_id).sum()) for s in shards)
    report[split] = {"shards": len(paths), "tokens": int(sum(len(s) for s in shards)), "documents": docs}
    if split == "train":
        starts = np.flatnonzero(shards[0] == tokenizer.bos_id)
        doc_lengths = np.diff(np.append(starts, len(shards[0])))
        tokens_per_shard = [len(s) for s in shards]
    print(f"{split:>5}: {report[split]['shards']} shards, {report[split]['tokens']:,} tokens, "
          f"{docs:,} documents")

fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.bar(range(len(tokens_per_shard)), tokens_per_shard)
left.set(xlabel="train shard", ylabel="tokens", title="tokens per shard")
right.hist(doc_lengths, bins=50)
right.set(xlabel="tokens per document (first shard)", ylabel="documents", yscale="log", title="document lengths")
fig.tight_layout()
fig.savefig(run_dir / "shards.png", dpi=120)
plt.show()
(run_dir / "summary.json").write_text(json.dumps(report, indent=1))

# %% [markdown]
# ## The CORE evaluation tasks
# `04_core_eval` scores the model on the 22 tasks of the DCLM paper. Each example is rendered into its prompt texts
# (few-shot examples first, drawn with a fixed seed per example) and tokenized here once: `shards/core/<task>.bin`
# holds one `<|bos|>` + prompt sequence per answer choice, and `<task>.records.bin` says where each sequence and
# its scored continuation start and end. The task files come from nanochat's eval bundle (downloaded once into
# `STACK_HOME/downloads`), from a local copy (`--core_bundle=folder`), or, in the tiny preset, from a small bundle
# generated offline. Tasks missing from a bundle are skipped with a note.

# %%
core_dir = sc.artifact_dir("shards") / "core"
bundle = core.find_bundle(cfg.core_bundle, synthetic=cfg.preset == "tiny")
manifest = []
for task in core.available_tasks(bundle):
    examples = core.load_examples(bundle, task)
    chosen = core.chosen_indices(len(examples), cfg.core_max_examples)
    rendered = [(i, core.render_example(task, examples, i)) for i in chosen]
    path = sc.write_core_shard(core_dir, task.label, rendered, tokenizer)
    manifest.append({"label": task.label, "kind": task.kind, "baseline": task.baseline, "examples": len(chosen)})
    print(f"{task.label:<34} {len(chosen):>6} examples {len(sc.read_shard(path)):>10,} tokens")
sc.write_core_manifest(core_dir, manifest)
print(f"{len(manifest)} CORE tasks written to {core_dir}")

# %% [markdown]
# ## Optional: push to the Hub
# With `push_repo` set (and a write token from `huggingface-cli login` or `HF_TOKEN`), the tokenizer and shards go
# to a private dataset repo. Next time, `--pretokenized_repo=<that repo>` downloads them instead of tokenizing.

# %%
if cfg.push_repo:
    print("pushed:", push_shards(cfg.push_repo, sc.stack_home()))
else:
    print("push_repo not set: shards stay local in", shard_dir)
