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
# 2. score every task, packing many examples into each forward pass, each choice's shared context only once;
# 3. compare with scoring one prompt at a time (the same answers, far slower);
# 4. a table and a bar chart per task, the checkpoint's validation bits per byte, and a results file.
#
# Headless: `python notebooks/04_core_eval.py --checkpoint=path/to/step_002000.pt`; on a node:
# `torchrun --nproc_per_node=8 notebooks/04_core_eval.py` (each rank scores a slice of every task).

# %% [markdown]
# ## Get the runtime ready
# This cell runs first in every notebook. It finds the project (the checkout you run in or, in a fresh Google Colab
# runtime, a clone in `/content/decoderstack`), puts it on `sys.path` and calls `sc.setup_runtime()`. In Colab that
# installs what `requirements.txt` asks for and the runtime lacks (never torch); anywhere it prints the GPU, its
# memory, the preset and the compute dtype, and elsewhere it installs nothing. In Colab, tick **use_drive** to keep
# `STACK_HOME` (every artifact) on Google Drive: each Colab notebook runs on its own machine, so Drive is how the
# next notebook finds what this one makes, and how artifacts survive a restart. Google asks for access once.

# %%
import os
import subprocess
import sys

use_drive = False  # @param {type:"boolean"}
ROOT = os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else ".")
if not os.path.isfile(os.path.join(ROOT, "stackcore.py")):  # not in a checkout: a fresh Colab runtime
    ROOT = "/content/decoderstack"
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth=1", "https://github.com/decoderstack/decoderstack", ROOT], check=True)
sys.path.insert(0, ROOT)
import stackcore as sc

sc.setup_runtime(use_drive)

# %% [markdown]
# ## Set-up
# The checkpoint is the newest one of `run_name` unless `checkpoint` names a file. The model runs in the compute
# dtype of this device with the fastest attention backend that works here.
#
# `compile=True` compiles the layers on a GPU. Scoring is forward passes only, where the many small elementwise
# steps between the matmuls (norms, rotary, ReLU², the residual mixing) cost as much as the matmuls themselves
# unless `torch.compile` fuses them. On an H100 that makes a full depth-20 pass 1.8x faster (61 s instead of 109 s;
# 56 s with FlashAttention-4 installed, which `attention="auto"` picks) and a depth-12 pass 2.2x faster, but
# compiling takes 1 to 3 minutes first. So it pays when one process scores more than once, and the default leaves
# it off: for a single evaluation the eager pass finishes first.

# %%
import json
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch


@dataclass
class CoreEvalConfig(sc.StackConfig):
    run_name: str = "pretrain"  # the 03_pretrain run whose newest checkpoint is evaluated
    checkpoint: str = ""  # a checkpoint file to evaluate instead
    pack_tokens: int = 32_768  # tokens per packed forward pass
    compare_examples: int = 50  # first examples of every task also scored one prompt at a time (0: skip)
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    compile: bool = False  # torch.compile the layers on GPUs for faster passes after a 1-1.5 minute warm-up
    PRESETS = {"tiny": dict(pack_tokens=4096)}


cfg = sc.configure(CoreEvalConfig)
dist_info = sc.init_distributed()
device = dist_info.device
log = print if dist_info.master else (lambda *args, **kwargs: None)
log(sc.describe_config(cfg))
run_dir = sc.artifact_dir("runs") / "04_core_eval"
run_dir.mkdir(parents=True, exist_ok=True)
checkpoint_path = cfg.checkpoint or sc.latest_checkpoint(sc.artifact_dir("checkpoints") / cfg.run_name)
if checkpoint_path is None:
    raise sc.MissingArtifactError(f"no checkpoint in {sc.artifact_dir('checkpoints') / cfg.run_name}: run "
                                  f"notebooks/03_pretrain first (STACK_HOME is {sc.stack_home()})")
model, checkpoint = sc.model_from_checkpoint(checkpoint_path, device)
model.set_compute_dtype(sc.pick_compute_dtype(device))
model.cast_weights_for_inference()  # evaluation only: no fp32 master weights to keep
backend = sc.pick_attention_backend(device, cfg.attention)
if cfg.compile and device.startswith("cuda"):
    model.compile_layers(evaluation=True)
tokenizer_dir = sc.artifact_dir("tokenizer")
tokenizer = sc.Tokenizer.load(tokenizer_dir)
shards = sc.read_core_shards(sc.artifact_dir("shards") / "core", tokenizer.vocab_size)
log(f"checkpoint {checkpoint_path} (step {checkpoint['step']}), {model.num_params()['total']:,} parameters, "
    f"attention {backend}; {len(shards)} CORE tasks, {sum(len(s.records) for s in shards):,} prompts")

# %% [markdown]
# ## Score every task
# A multiple-choice or schema example is right when its gold choice has the lowest mean loss over the continuation
# tokens; a language-modelling example when greedy decoding gives the continuation token for token. Examples of
# different lengths are packed back to back into one sequence of up to `pack_tokens` tokens. The choices of an
# example share their start (mostly the few-shot context, 3-4x the continuation tokens in the multiple-choice
# tasks), so each example goes in as a tree: the shared tokens once, then each choice's own tokens, with a
# FlexAttention mask that lets every choice see the shared part and itself only, exactly as if it ran alone.
# That cuts the tokens of a full pass about threefold (98M to 32M on the 18 tasks of the full data).
#
# A warm-up comes first: the first packed pass of every task, and its first two examples one prompt at a time. It
# compiles FlexAttention for the prefix-tree passes and, with `compile=True`, the layers (one graph over all of
# them) for every kind of pass, one-time costs kept apart from the timed passes. Full-size passes, because kernels
# tuned on first use keep what suited the sizes they saw then.

# %%
started = time.time()
sc.evaluate_core(model, [sc.first_pack(shard, cfg.pack_tokens, model.config.max_seq_len) for shard in shards],
                 backend, device, cfg.pack_tokens)
sc.evaluate_core(model, [sc.first_examples(shard, 2) for shard in shards], backend, device)
warmup_seconds = time.time() - started
log(f"warm-up: {warmup_seconds:.1f} s")
started = time.time()
results = sc.evaluate_core(model, shards, backend, device, cfg.pack_tokens, log=log)
packed_seconds = time.time() - started
log(f"{'task':<34} {'kind':<18} {'examples':>8} {'accuracy':>9} {'baseline':>9} {'centred':>8}")
for shard in shards:
    task = results["tasks"][shard.label]
    log(f"{shard.label:<34} {shard.kind:<18} {task['examples']:>8} {task['accuracy']:>9.3f} "
        f"{task['baseline']:>9.3f} {task['centered']:>8.3f}")
fed_tokens = sum(sc.core_input_tokens(s, model.config.max_seq_len, cfg.pack_tokens) for s in shards)
scored_examples = sum(task["examples"] for task in results["tasks"].values())
log(f"CORE {results['core']:.4f} in {sc.format_duration(packed_seconds)} ({packed_seconds:.1f} s, "
    f"{fed_tokens:,} tokens fed, {fed_tokens / packed_seconds:,.0f} tokens/s, "
    f"{scored_examples / packed_seconds:,.1f} examples/s)")

# %% [markdown]
# ## Packed against one prompt at a time
# The first `compare_examples` examples of every task, scored again with one prompt per forward pass, must give
# the same answers; the packed passes keep the accelerator busy and run each shared context once, which is where
# the speed-up comes from.

# %%
compared = [sc.first_examples(shard, cfg.compare_examples) for shard in shards] if cfg.compare_examples else []
timings = {}
for name, pack_tokens in (("packed", cfg.pack_tokens), ("one_by_one", 0)):
    started = time.time()
    timings[name] = (sc.evaluate_core(model, compared, backend, device, pack_tokens), time.time() - started)
    tokens = sum(sc.core_input_tokens(s, model.config.max_seq_len, pack_tokens) for s in compared)
    examples = sum(task["examples"] for task in timings[name][0]["tasks"].values())
    log(f"{name}: {timings[name][1]:.2f} s, {tokens:,} tokens fed ({tokens / timings[name][1]:,.0f}/s), "
        f"{examples / timings[name][1]:,.1f} examples/s")
same = all(timings["packed"][0]["tasks"][s.label]["accuracy"] == timings["one_by_one"][0]["tasks"][s.label]["accuracy"]
           for s in compared)
if compared:
    speedup = timings["one_by_one"][1] / max(timings["packed"][1], 1e-9)
    log(f"first {cfg.compare_examples} examples of each task: packed {speedup:.1f}x faster than one at a time; "
        f"same accuracies: {same}")

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
# ## Validation bits per byte and the results file
# Bits per byte on the same validation tokens `03_pretrain` measured, so the two numbers sit side by side in
# `runs/04_core_eval/results.json`.

# %%
train_config = checkpoint["config"]
token_bytes = torch.from_numpy(np.load(sc.require_artifact(tokenizer_dir / sc.TOKEN_BYTES, "01_tokenizer")))
val_loader = sc.PretrainLoader(sc.require_artifact(sc.artifact_dir("shards") / "pretrain", "02_sharding"), "val",
                               tokens=train_config["micro_tokens"], bos_id=tokenizer.bos_id,
                               vocab_size=tokenizer.vocab_size, max_doc_len=model.config.max_seq_len,
                               rank=dist_info.rank, world_size=dist_info.world_size, device=device)
val_steps = max(1, train_config["eval_tokens"] // (train_config["micro_tokens"] * dist_info.world_size))
val_bpb = sc.evaluate_bpb(model, val_loader, val_steps, token_bytes.to(device), backend)
summary = {"checkpoint": str(checkpoint_path), "step": checkpoint["step"], "preset": cfg.preset,
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "ranks": dist_info.world_size, "attention": backend, "core": results["core"], "val_bpb": val_bpb,
           "seconds": round(packed_seconds, 2), "warmup_seconds": round(warmup_seconds, 2),
           "tokens_per_second": round(fed_tokens / packed_seconds),
           "tasks": results["tasks"],
           "speed": {name: round(seconds, 3) for name, (_, seconds) in timings.items()}}
if dist_info.master:
    (run_dir / "results.json").write_text(json.dumps(summary, indent=1))
    log(f"val bpb {val_bpb:.4f} | CORE {results['core']:.4f} | written {run_dir / 'results.json'}")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
