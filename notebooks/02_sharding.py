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
# 5. render the conversations of the fine-tuning mixture, with their loss masks, for `05_sft`;
# 6. render the GSM8K questions as prompts, with their answers, for `06_rl`;
# 7. optionally push your shards to the Hub so your next Colab session can download them instead.
#
# Headless: `python notebooks/02_sharding.py --shard_tokens=50000000`.

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
# The corpus settings are the ones `01_tokenizer` used (the same `CorpusConfig`), so both read the same documents.

# %%
import collections
import itertools
import json
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
from tqdm.auto import tqdm

from data import core, gsm8k, sft
from data.hub import pull_shards, push_shards
from data.pretrain import CorpusConfig, iter_documents
from data.tokenizing import stamp_shards, tokenize_parallel
from notebooks.config import above, at_least, configure, describe_config, in_notebook_kernel


@dataclass
class ShardingConfig(CorpusConfig, sft.SFTMixture, gsm8k.GsmPromptConfig):
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
    LIMITS = {"max_chars": at_least(0), "shard_tokens": above(0), "val_docs": above(0),
              "workers": at_least(0), "core_max_examples": at_least(0)}


cfg = configure(ShardingConfig)
print(describe_config(cfg))
# progress bars in a notebook or a terminal; none in a log file, where every redraw would add text to it
hide_progress = not (in_notebook_kernel() or sys.stderr.isatty())
shard_dir = sc.artifact_dir("shards") / "pretrain"
run_dir = sc.artifact_dir("runs") / "02_sharding"
run_dir.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Option A: download ready-made shards
# If `pretokenized_repo` is set, the tokenizer and shards come from that dataset repo and replace your own
# tokenizer (shards only make sense with the tokenizer that wrote them). Leave it empty to tokenize yourself.
# A tokenizer's fingerprint, a hash of its ranks, split pattern and special tokens, tells two tokenizers apart even at
# the same vocabulary size: every shard folder records the one that wrote it, and every checkpoint the one it was
# trained with, and later notebooks refuse them with another tokenizer.

# %%
def local_tokenizer_fingerprint() -> str | None:
    """The fingerprint of the tokenizer in STACK_HOME; None where there is none, or only a damaged one."""
    try:
        return sc.Tokenizer.load(sc.artifact_dir("tokenizer")).fingerprint
    except (FileNotFoundError, ValueError):
        return None


if cfg.pretokenized_repo:
    replaced = local_tokenizer_fingerprint()
    pull_shards(cfg.pretokenized_repo, sc.stack_home())
    print(f"downloaded {cfg.pretokenized_repo} into {sc.stack_home()}")
tokenizer_dir = sc.artifact_dir("tokenizer")
tokenizer = sc.Tokenizer.load(tokenizer_dir)
print(f"tokenizer: {tokenizer.vocab_size} tokens, BOS id {tokenizer.bos_id}, fingerprint {tokenizer.fingerprint}")
if cfg.pretokenized_repo and replaced not in (None, tokenizer.fingerprint):
    print(f"note: {cfg.pretokenized_repo}'s tokenizer replaced another one ({replaced}) in {tokenizer_dir}; the "
          f"checkpoints made with that one no longer match it: start new runs (or give each tokenizer its own "
          f"STACK_HOME)")

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
    for ids in tqdm(tokenize_parallel(tokenizer_dir, docs, workers), total=total, desc=split, unit="doc",
                    disable=hide_progress):
        writer.add(ids)
    writer.flush()
    return writer.written


if not cfg.pretokenized_repo:
    stamp_shards(shard_dir, None)
    for old in shard_dir.glob("*.bin"):
        old.unlink()  # a smaller re-run must not leave stale shards of a larger one behind
    files = cfg.resolve()
    t0 = time.time()
    written = {"train": write_split("train", iter_documents(files, "train", cfg.max_chars), None)}
    train_seconds = time.time() - t0
    val_docs = [doc for _, doc in zip(range(cfg.val_docs), iter_documents(files, "val"))]
    written["val"] = write_split("val", val_docs, len(val_docs))
    stamp_shards(shard_dir, tokenizer)
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
left.set_xticks(range(len(tokens_per_shard)))
left.set(xlabel="train shard (index)", ylabel="tokens", title="tokens per train shard")
right.hist(doc_lengths, bins=50)
right.set(xlabel="tokens per document", ylabel="documents", yscale="log",
          title="document lengths in the first train shard")
fig.suptitle(f"shards of {cfg.pretokenized_repo or cfg.corpus + ' corpus'}, {tokenizer.vocab_size}-token vocabulary")
fig.tight_layout()
fig.savefig(run_dir / "shards.png", dpi=120)
plt.show()
(run_dir / "summary.json").write_text(json.dumps(report, indent=1));

# %% [markdown]
# ## Look inside: a shard's header and a document boundary
# A shard is a header of 256 int32 followed by the tokens, nothing else: that is why the loader can memory-map it
# and slice any range without parsing. The header's first five numbers say what follows (modded-nanogpt's magic
# number and version, the token count, then ours: the vocabulary the ids were checked against and the record
# width); the rest is reserved, zero. Read raw with numpy here, they are what `sc.read_shard` checks on every open.
# Then the token stream around the start of the second document: `<|bos|>` is the only boundary there is, and the
# document lengths in the histogram above are the gaps between them.

# %%
first_shard = sc.list_shards(shard_dir, "train")[0]
header = np.fromfile(first_shard, dtype=np.int32, count=sc.HEADER_INTS)
kind, dtype = sc.SHARD_VERSIONS[int(header[1])]
for name, value in zip(("magic", "version", "count", "vocabulary", "record width"), header[:5]):
    print(f"{name:>12}: {value}")
print(f"{'reserved':>12}: {np.count_nonzero(header[5:])} non-zero of {len(header) - 5}")
print(f"{first_shard.name}: {first_shard.stat().st_size:,} bytes = {sc.HEADER_BYTES} header + {header[2]:,} {kind} "
      f"x {np.dtype(dtype).itemsize} bytes ({np.dtype(dtype).name})\n")
stream = sc.read_shard(first_shard, tokenizer.vocab_size)
document_starts = np.flatnonzero(stream == tokenizer.bos_id)
# a shard of one document (a tiny max_chars, or shard_tokens below a document) has no second start: show the first
boundary = int(document_starts[1]) if len(document_starts) > 1 else 0
print(f"{'position':>9} {'id':>6}  text")
for position in range(max(boundary - 6, 0), min(boundary + 7, len(stream))):
    token = int(stream[position])
    mark = "   <- a new document starts" if token == tokenizer.bos_id else ""
    print(f"{position:>9} {token:>6}  {tokenizer.decode([token])!r}{mark}")

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
stamp_shards(core_dir, None)
manifest = []
for task in core.available_tasks(bundle):
    examples = core.load_examples(bundle, task)
    chosen = core.chosen_indices(len(examples), cfg.core_max_examples)
    rendered = [(i, core.render_example(task, examples, i)) for i in chosen]
    path = core.write_core_shard(core_dir, task.label, rendered, tokenizer)
    manifest.append({"label": task.label, "kind": task.kind, "baseline": task.baseline, "examples": len(chosen)})
    print(f"{task.label:<34} {len(chosen):>6} examples {len(sc.read_shard(path)):>10,} tokens")
core.write_core_manifest(core_dir, manifest)
stamp_shards(core_dir, tokenizer)
print(f"{len(manifest)} CORE tasks written to {core_dir}")

# %% [markdown]
# ## The conversations for fine-tuning
# `05_sft` teaches the pretrained model to chat. Its data is a mixture of conversations (`data/sft.py`): general
# chat (SmolTalk), multiple-choice questions answered with a letter (MMLU, ARC), maths with calculator calls
# (GSM8K), spelling and letter counting with a python call, and a few conversations about who the model is. The
# `sft_*` settings say how many conversations each source gives; the tiny preset uses generated data only, offline.
#
# A conversation becomes tokens with `sc.render_conversation`: `<|bos|>`, then each turn between its special tokens.
# It also returns a **loss mask**, 1 on the tokens the model should learn to write (the assistant's text, its
# calculator expressions, `<|assistant_end|>`) and 0 on everything it is given (the user's words, the calculator's
# output, which the engine writes at inference time). Here is one, the trained tokens in brackets:

# %%
# NBVAL_CHECK_OUTPUT
# (the output is the same on every machine: the tests compare it with the saved one)
example = sft.synthetic_conversations(1, seed=0)[0]
ids, mask = sc.render_conversation(tokenizer, example)
pieces = []
for trained, run in itertools.groupby(zip(ids, mask), key=lambda pair: pair[1]):
    text = tokenizer.decode([token for token, _ in run])
    pieces.append(f"[{text}]" if trained else text)
print("".join(pieces))
print(f"{len(ids)} tokens, {sum(mask)} trained on")

# %% [markdown]
# ## Write the conversation shards
# Every conversation is rendered (by several processes), cut to `sft_max_tokens`, and written whole into
# `shards/sft/train_*.bin`, back to back like pretraining documents, each starting with `<|bos|>`. Its mask goes to
# the parallel side file `train_*.mask.bin`, one byte per token. A spread-out `sft_val` of them go to `val_*.bin`
# instead, for the validation loss of `05_sft`. The loader of `05_sft` shuffles conversations every epoch, so the
# order here (source by source) does not matter.

# %%
sft_dir = sc.artifact_dir("shards") / "sft"
stamp_shards(sft_dir, None)
for old in sft_dir.glob("*.bin"):
    old.unlink()
writers = {split: sft.ConversationWriter(sft_dir, split, cfg.shard_tokens, tokenizer.vocab_size, tokenizer.bos_id)
           for split in ("train", "val")}
val_stride = max(2, sum(cfg.counts().values()) // max(cfg.sft_val, 1))
sources = []  # the source of each conversation, in order, filled as the renderers consume the mixture


def mixture_conversations():
    for source, conversation in sft.iter_mixture(cfg):
        sources.append(source)
        yield conversation


stats = collections.defaultdict(collections.Counter)
lengths = collections.defaultdict(list)
workers = cfg.workers or os.cpu_count() or 1
rendered = sft.render_parallel(tokenizer_dir, mixture_conversations(), cfg.sft_max_tokens, workers)
for n, (ids, mask) in enumerate(tqdm(rendered, total=sum(cfg.counts().values()), desc="sft", unit="conv",
                                     disable=hide_progress)):
    split = "val" if n % val_stride == 0 and stats["val"]["conversations"] < cfg.sft_val else "train"
    writers[split].add(ids, mask)
    for key in (split, sources[n]):
        stats[key].update(conversations=1, tokens=len(ids), trained=int(mask.sum()))
    lengths[sources[n]].append(len(ids))
for writer in writers.values():
    writer.flush()
stamp_shards(sft_dir, tokenizer)
print(f"{'source':<14} {'conversations':>13} {'tokens':>12} {'trained':>8}")
for key in (*sft.SFT_SOURCES, "train", "val"):
    if stats[key]["conversations"]:
        row = stats[key]
        print(f"{key:<14} {row['conversations']:>13,} {row['tokens']:>12,} {row['trained'] / row['tokens']:>8.1%}")
report["sft"] = {key: dict(stats[key]) for key in stats}
(run_dir / "summary.json").write_text(json.dumps(report, indent=1));

# %% [markdown]
# The lengths decide how well conversations pack: `05_sft` fills each batch with whole conversations, so many short
# ones (a letter answer) and a few long ones (a SmolTalk chat) share a batch without padding.

# %%
fig, ax = plt.subplots(figsize=(8, 3))
for source, values in lengths.items():
    ax.hist(values, bins=40, alpha=0.6, label=source)
ax.set(xlabel="tokens per conversation", ylabel="conversations", yscale="log",
       title="conversation lengths in the SFT mixture, by source")
ax.legend()
fig.tight_layout()
fig.savefig(run_dir / "sft_lengths.png", dpi=120)
plt.show()

# %% [markdown]
# ## The GSM8K prompts for reinforcement learning
# `06_rl` asks the fine-tuned model grade-school maths questions (GSM8K), samples several answers to each, and
# rewards the ones whose final `#### N` is right. Here each question is rendered as a conversation and cut right
# after `<|assistant_start|>` (`sc.render_for_completion`): the exact prompt the engine continues. The prompts go
# back to back into `shards/gsm8k/<split>.bin`; the side file `<split>.records.bin` holds one row per prompt with its
# start and end offsets, the problem's index and the gold answer (GSM8K answers are all integers). The problems come
# from the Hub (`openai/gsm8k`), a local copy (`--rl_gsm8k_source=folder` with `train.jsonl` and `test.jsonl`) or,
# in the tiny preset, a generator of small problems in the same format.

# %%
gsm8k_dir = sc.artifact_dir("shards") / "gsm8k"
stamp_shards(gsm8k_dir, None)
report["gsm8k"] = {}
for split, limit in (("train", cfg.rl_train_prompts), ("test", cfg.rl_test_prompts)):
    problems = gsm8k.load_problems(split, cfg.rl_gsm8k_source)[:limit or None]
    prompts = [gsm8k.TaskPrompt(sc.render_for_completion(tokenizer, problem.prompt()), problem.gold, i)
               for i, problem in enumerate(problems)]
    gsm8k.write_prompt_shard(gsm8k_dir, split, prompts, tokenizer.vocab_size)
    lengths = [len(prompt.ids) for prompt in prompts]
    report["gsm8k"][split] = {"prompts": len(prompts), "tokens": sum(lengths), "longest": max(lengths)}
    print(f"GSM8K {split:>5}: {len(prompts):>5,} prompts, {sum(lengths):>9,} tokens, longest {max(lengths)}")
stamp_shards(gsm8k_dir, tokenizer)
(run_dir / "summary.json").write_text(json.dumps(report, indent=1))
first = gsm8k.read_prompt_shard(gsm8k_dir, "test", tokenizer.vocab_size)[0]
print(f"the first test prompt, as the engine sees it (gold answer {first.gold}):\n{tokenizer.decode(first.ids)}")

# %% [markdown]
# ## Optional: push to the Hub
# With `push_repo` set (and a write token from `huggingface-cli login` or `HF_TOKEN`), the tokenizer and shards go
# to a private dataset repo. Next time, `--pretokenized_repo=<that repo>` downloads them instead of tokenizing.

# %%
if cfg.push_repo:
    print("pushed:", push_shards(cfg.push_repo, sc.stack_home()))
else:
    print("push_repo not set: shards stay local in", shard_dir)
