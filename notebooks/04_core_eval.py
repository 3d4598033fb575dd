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
# # 04 · CORE: how good is the base model?
#
# Validation bits per byte says how well the model predicts text; CORE (from the DCLM paper, as nanochat uses it)
# says what that buys on 22 tasks: multiple-choice questions, Winograd-style schemas and exact completions. Each
# task's accuracy is centred, so 0 is random guessing and 1 is perfect, and CORE is their mean.
#
# Steps:
# 1. set-up: load the newest checkpoint of `03_pretrain` and the task shards of `02_sharding`;
# 2. look inside: one example as a prefix tree, its attention mask, and the same scores as one prompt at a time;
# 3. score every task, packing many examples into each forward pass, each choice's shared context only once;
# 4. a table and a bar chart per task, the checkpoint's validation bits per byte, and a summary file.
#
# With `benchmark=True` (the `baselines/` scripts pass it) it also times a warm-up apart from the scored pass and
# scores the first examples of every task again one prompt at a time, to compare speeds.
#
# Headless: `python notebooks/04_core_eval.py --checkpoint=path/to/step_002000.pt`; on a node:
# `torchrun --nproc_per_node=8 notebooks/04_core_eval.py` (each rank scores a slice of every task).

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
# The checkpoint is the newest one of `run_name` unless `checkpoint` names a file. The model runs in the compute
# dtype of this device with the fastest attention backend that works here.
#
# `compile=True` compiles the layers on a GPU. Scoring is forward passes only, where the many small elementwise
# steps between the matmuls (norms, rotary, ReLU², the residual mixing) weigh as much as the matmuls themselves
# unless `torch.compile` fuses them. Compiling costs minutes before the first pass, so it pays when one process
# scores more than once; the default leaves it off, since for a single evaluation the eager pass finishes first.
#
# Measured (H100, depth 12 and 20, eager against compiled):
# [record 2026-11-25-core-compiled](../baselines/2026-11-25-core-compiled/README.md);
# with FlashAttention-4: [record 2026-11-25-core-60s](../baselines/2026-11-25-core-60s/README.md).

# %%
import json
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch

from data.tokenizing import check_shards_tokenizer
from notebooks.config import ATTENTION_SETTING, StackConfig, above, at_least, configure, describe_config, folder_name
from notebooks.core_eval import core_input_tokens, first_examples, first_pack
from notebooks.report import format_duration
from notebooks.runs import run_checkpoint
from notebooks.training import validation_steps


@dataclass
class CoreEvalConfig(StackConfig):
    run_name: str = "pretrain"  # the 03_pretrain run whose newest checkpoint is evaluated
    checkpoint: str = ""  # a checkpoint file to evaluate instead
    pack_tokens: int = 32_768  # tokens per packed forward pass
    benchmark: bool = False  # time a warm-up apart and compare with one prompt at a time (the baselines/ scripts)
    compare_examples: int = 50  # with benchmark: first examples of every task also scored one prompt at a time
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    compile: bool = False  # torch.compile the layers on GPUs: faster passes after a compilation warm-up
    PRESETS = {"tiny": dict(pack_tokens=4096)}
    LIMITS = {"run_name": folder_name(), "pack_tokens": above(0), "compare_examples": at_least(0),
              "attention": ATTENTION_SETTING}


cfg = configure(CoreEvalConfig)
dist_info = sc.init_distributed()
device = dist_info.device
log = print if dist_info.master else (lambda *args, **kwargs: None)
log(describe_config(cfg))
run_dir = sc.artifact_dir("runs") / "04_core_eval"
run_dir.mkdir(parents=True, exist_ok=True)
checkpoint_path = cfg.checkpoint or run_checkpoint(cfg.run_name, "run_name", "03_pretrain")
tokenizer_dir = sc.artifact_dir("tokenizer")
tokenizer = sc.Tokenizer.load(tokenizer_dir)
model, checkpoint = sc.model_from_checkpoint(checkpoint_path, device, tokenizer)  # its maker: from its run folder
model.set_compute_dtype(sc.pick_compute_dtype(device))
model.cast_weights_for_inference()  # evaluation only: no fp32 master weights to keep
backend = sc.pick_attention_backend(device, cfg.attention)
if cfg.compile and device.startswith("cuda"):
    model.compile_layers(evaluation=True)
core_dir = sc.artifact_dir("shards") / "core"
check_shards_tokenizer(core_dir, tokenizer)
shards = sc.read_core_shards(core_dir, tokenizer.vocab_size)
log(f"checkpoint {checkpoint_path} (step {checkpoint['step']}), {model.num_params()['total']:,} parameters, "
    f"attention {backend}; {len(shards)} CORE tasks, {sum(len(s.records) for s in shards):,} prompts")

# %% [markdown]
# ## Look inside: one example as a prefix tree
# Take the first example of the first task with several choices. `sc.core_examples` gives each choice as one token
# sequence (`<|bos|>`, context, continuation) and where its scored continuation starts. `sc.pack_core_examples`
# lays the example out as a tree: the input tokens all choices share (branch 0), then each choice's own tokens
# (branch c + 1), each with its position in its choice's sequence, so the rotary angles are those of the choice
# run alone. `sc.shared_prefix_mask_mod` says which earlier token each token may attend to: the shared prefix and
# its own branch, never a sibling branch. Drawn below: white where attention is allowed.
#
# Why the shared context is scored once: causal attention means a token's hidden states depend only on the tokens
# before it. The shared prefix comes before every choice's own tokens, so its states are the same in every choice's
# sequence; computing them once and letting every branch attend to them gives each choice exactly the logits it
# would get alone. The cell checks that: the same example scored packed and one prompt at a time.

# %%
choice_column, gold_column = (sc.CORE_RECORD_FIELDS.index(field) for field in ("choice", "gold"))
tree_shard = next(s for s in shards if s.records[:, choice_column].max() > 0)
first_records = first_examples(tree_shard, 1).records
choices = next(sc.core_examples(tree_shard.tokens, first_records, model.config.max_seq_len))
pack = sc.pack_core_examples([choices])
mask_mod = sc.shared_prefix_mask_mod(*(torch.from_numpy(a) for a in (pack.documents, pack.branches, pack.positions)),
                                     None)
index = torch.arange(len(pack.inputs))
tree_mask = mask_mod(0, 0, index[:, None], index[None, :]).numpy()
shared = sc.shared_prefix_length(choices)
log(f"{tree_shard.label}, example 0: {len(choices)} choices; {shared} shared input tokens, own tokens per choice "
    f"{[int((pack.branches == b).sum()) for b in range(1, len(choices) + 1)]}")
log(f"tokens fed: {sc.shared_prefix_cost(choices)} as a tree, {sum(len(seq) - 1 for seq, _ in choices)} one "
    f"choice at a time")
for c, (seq, start) in enumerate(choices):
    log(f"  choice {c}{' (gold)' if first_records[c, gold_column] else ''}: ...{tokenizer.decode(seq[max(shared - 8, 1):start])!r}"
        f" -> scored {tokenizer.decode(seq[start:])!r}")
packed_scores = sc.score_core_records(model, tree_shard.tokens, first_records, backend, device, cfg.pack_tokens)
alone_scores = sc.score_core_records(model, tree_shard.tokens, first_records, backend, device, 0)
log(f"{'choice':>6} {'mean loss packed':>17} {'one at a time':>14}")
for c, (packed_loss, alone_loss) in enumerate(zip(packed_scores[:, 0], alone_scores[:, 0])):
    log(f"{c:>6} {packed_loss:>17.4f} {alone_loss:>14.4f}")
if dist_info.master:
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(tree_mask, cmap="gray", interpolation="nearest")
    for boundary in np.flatnonzero(np.diff(pack.branches)) + 0.5:
        ax.axhline(boundary, color="tab:red", lw=0.6)
        ax.axvline(boundary, color="tab:red", lw=0.6)
    ax.set(xlabel="key (packed token)", ylabel="query (packed token)",
           title=f"prefix-tree mask: shared context, then {len(choices)} choices")
    fig.tight_layout()
    fig.savefig(run_dir / "prefix_tree_mask.png", dpi=120)
    plt.show()

# %% [markdown]
# ## Score every task
# A multiple-choice or schema example is right when its gold choice has the lowest mean loss over the continuation
# tokens; a language-modelling example when greedy decoding gives the continuation token for token. Examples of
# different lengths are packed back to back into one sequence of up to `pack_tokens` tokens. The choices of an
# example share their start (mostly the few-shot context, far longer than the continuations), so each example goes
# in as a tree: the shared tokens once, then each choice's own tokens, with a
# FlexAttention mask that lets every choice see the shared part and itself only, exactly as if it ran alone.
# The tokens fed shrink by the shared context times (choices - 1) per example, as the look inside above counted.
#
# With `benchmark=True`, a warm-up comes first: the first packed pass of every task, and its first two examples one
# prompt at a time. It compiles FlexAttention for the prefix-tree passes and, with `compile=True`, the layers (one
# graph over all of them) for every kind of pass, one-time costs kept apart from the timed passes. Full-size
# passes, because kernels tuned on first use keep what suited the sizes they saw then. Without it, those one-time
# costs fall inside the scored pass, which is what a single evaluation pays anyway.

# %%
warmup_seconds = None
if cfg.benchmark:
    started = time.time()
    sc.evaluate_core(model, [first_pack(shard, cfg.pack_tokens, model.config.max_seq_len) for shard in shards],
                     backend, device, cfg.pack_tokens)
    sc.evaluate_core(model, [first_examples(shard, 2) for shard in shards], backend, device)
    warmup_seconds = round(time.time() - started, 2)
    log(f"warm-up: {warmup_seconds:.1f} s")
started = time.time()
results = sc.evaluate_core(model, shards, backend, device, cfg.pack_tokens, log=log)
packed_seconds = time.time() - started
log(f"{'task':<34} {'kind':<18} {'examples':>8} {'accuracy':>9} {'baseline':>9} {'centred':>8}")
for shard in shards:
    task = results["tasks"][shard.label]
    log(f"{shard.label:<34} {shard.kind:<18} {task['examples']:>8} {task['accuracy']:>9.3f} "
        f"{task['baseline']:>9.3f} {task['centered']:>8.3f}")
fed_tokens = sum(core_input_tokens(s, model.config.max_seq_len, cfg.pack_tokens) for s in shards)
scored_examples = sum(task["examples"] for task in results["tasks"].values())
log(f"CORE {results['core']:.4f} in {format_duration(packed_seconds)} ({packed_seconds:.1f} s, "
    f"{fed_tokens:,} tokens fed, {fed_tokens / packed_seconds:,.0f} tokens/s, "
    f"{scored_examples / packed_seconds:,.1f} examples/s)")

# %% [markdown]
# ## Benchmark only: packed against one prompt at a time
# With `benchmark=True`, the first `compare_examples` examples of every task are scored again with one prompt per
# forward pass: the same answers, and the time both ways. The packed passes keep the accelerator busy and run each
# shared context once, which is where the speed-up comes from. Off by default: the look inside above already showed
# on one example that both ways give the same scores.

# %%
timings = {}
if cfg.benchmark:
    compared = [first_examples(shard, cfg.compare_examples) for shard in shards]
    for name, pack_tokens in (("packed", cfg.pack_tokens), ("one_by_one", 0)):
        started = time.time()
        timings[name] = (sc.evaluate_core(model, compared, backend, device, pack_tokens), time.time() - started)
        tokens = sum(core_input_tokens(s, model.config.max_seq_len, pack_tokens) for s in compared)
        examples = sum(task["examples"] for task in timings[name][0]["tasks"].values())
        log(f"{name}: {timings[name][1]:.2f} s, {tokens:,} tokens fed ({tokens / timings[name][1]:,.0f}/s), "
            f"{examples / timings[name][1]:,.1f} examples/s")
    same = all(timings["packed"][0]["tasks"][s.label]["accuracy"]
               == timings["one_by_one"][0]["tasks"][s.label]["accuracy"] for s in compared)
    speedup = timings["one_by_one"][1] / max(timings["packed"][1], 1e-9)
    log(f"first {cfg.compare_examples} examples of each task: packed {speedup:.1f}x faster than one at a time; "
        f"same accuracies: {same}")
else:
    log("benchmark=False: no warm-up timing and no one-prompt-at-a-time comparison")

# %% [markdown]
# ## Centred accuracy per task
# Bars above zero beat random guessing. A small model sits near zero on most tasks: CORE rises with scale and
# training tokens, which is why nanochat reports it next to bits per byte.

# %%
if dist_info.master:
    labels = [shard.label for shard in shards]
    centred = [results["tasks"][label]["centered"] for label in labels]
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(range(len(labels)), centred, color=["tab:green" if c > 0 else "tab:red" for c in centred])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=75, fontsize=8)
    examples = sorted({results["tasks"][label]["examples"] for label in labels})
    per_task = f"{examples[0]}" if len(examples) == 1 else f"{examples[0]}-{examples[-1]}"
    source = "synthetic examples per task (tiny preset)" if cfg.preset == "tiny" else "examples per task"
    ax.set(ylabel="centred accuracy\n(0: random guessing)",
           title=f"CORE {results['core']:.4f} at step {checkpoint['step']}, on {per_task} {source}")
    fig.tight_layout()
    fig.savefig(run_dir / "core.png", dpi=120)
    plt.show()

# %% [markdown]
# ## Validation bits per byte and the summary file
# Bits per byte on the same validation tokens `03_pretrain` measured, so the two numbers sit side by side in
# `runs/04_core_eval/summary.json` (which the report card of `07_chat` reads).

# %%
train_config = checkpoint["config"]
token_bytes = torch.from_numpy(tokenizer.token_bytes())
val_dir = sc.require_artifact(sc.artifact_dir("shards") / "pretrain", "02_sharding")
check_shards_tokenizer(val_dir, tokenizer)
val_loader = sc.PretrainLoader(val_dir, "val",
                               tokens=train_config.get("eval_batch_tokens") or train_config["micro_tokens"],
                               bos_id=tokenizer.bos_id,
                               vocab_size=tokenizer.vocab_size, max_doc_len=model.config.max_seq_len,
                               rank=dist_info.rank, world_size=dist_info.world_size, device=device)
val_steps = validation_steps(train_config["eval_tokens"], val_loader, dist_info.world_size)
val_bpb = sc.evaluate_bpb(model, val_loader, val_steps, token_bytes.to(device), backend)
summary = {"checkpoint": str(checkpoint_path), "step": checkpoint["step"], "preset": cfg.preset,
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "ranks": dist_info.world_size, "attention": backend, "core": results["core"], "val_bpb": val_bpb,
           "seconds": round(packed_seconds, 2), "warmup_seconds": warmup_seconds,
           "tokens_per_second": round(fed_tokens / packed_seconds),
           "tasks": results["tasks"],
           "speed": {name: round(seconds, 3) for name, (_, seconds) in timings.items()}}
if dist_info.master:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(f"val bpb {val_bpb:.4f} | CORE {results['core']:.4f} | written {run_dir / 'summary.json'}")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
