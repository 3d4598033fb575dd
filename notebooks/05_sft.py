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
# # 05 · Supervised fine-tuning: from a text predictor to a chat model
#
# The pretrained model continues text. To chat, it has to learn the chat format: whose turn it is, when its answer
# ends, how to answer a multiple-choice question with one letter, when to call the calculator. Supervised
# fine-tuning (SFT) shows it conversations of that kind and trains it to write the assistant's parts, and only
# those: the user's words and the calculator's output are given, never predicted.
#
# Steps:
# 1. set-up: the newest checkpoint of `03_pretrain` and the conversation shards of `02_sharding`;
# 2. the chat evals of the base model, for comparison: multiple choice (ARC, MMLU), maths with a calculator
#    (GSM8K), code (HumanEval, run in a sandbox), spelling;
# 3. the optimizers of `03_pretrain` at a lower learning rate, and batches of whole conversations packed without
#    padding;
# 4. the training loop, in view, with the validation loss and resumable checkpoints;
# 5. the chat evals again: a table, a bar chart before and after, and a results file.
#
# Headless: `python notebooks/05_sft.py --steps=800`; on a node:
# `torchrun --nproc_per_node=8 notebooks/05_sft.py --preset=node`.

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
# The chat-eval settings (`chat_*`, see `data/chat_eval.py`) pick the tasks and how many examples each gets.
# `steps=0` trains one epoch of the mixture. `lr_scale` multiplies the learning rates of pretraining: the model
# already knows a lot, and fine-tuning should adjust it, not overwrite it.

# %%
import dataclasses
import json
import math
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import torch

from data.chat_eval import (ChatEvalConfig, chat_table, describe_tasks, evaluate_chat, load_chat_tasks,
                            plot_chat_results)
from data.tokenizing import check_shards_tokenizer
from notebooks.config import (ATTENTION_SETTING, above, accumulation_steps, at_least, configure, describe_config,
                              folder_name)
from notebooks.report import format_duration
from notebooks.runs import run_checkpoint
from notebooks.sft import evaluate_sft_loss, sft_backward
from notebooks.training import prepare_run_folders


@dataclass
class SFTConfig(ChatEvalConfig):
    base_run: str = "pretrain"  # the 03_pretrain run whose newest checkpoint is fine-tuned
    checkpoint: str = ""  # a checkpoint file to fine-tune instead
    run_name: str = "sft"  # name of the run folder and checkpoint folder (07_chat looks for "sft")
    tokens_per_step: int = 524_288  # global batch in tokens (whole conversations, so about this many)
    micro_tokens: int = 65_536  # most tokens per forward/backward pass on one GPU
    steps: int = 0  # optimizer steps (0: one epoch of the mixture)
    lr_scale: float = 0.8  # learning rates are those of 03_pretrain times this
    cooldown_frac: float = 0.5  # the last half of the steps decay the learning rates linearly to zero
    eval_every: int = 100  # steps between validation losses (and at the end)
    eval_steps: int = 20  # validation batches per measurement, all ranks together (rounded up to a multiple)
    save_every: int = 500  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # the run's newest checkpoints kept on disk (0: all of them)
    pack_tokens: int = 32_768  # tokens per packed forward pass when scoring multiple choice
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    compile: bool = False  # torch.compile(dynamic=True) on GPUs (batches vary in length; see baselines/bench_sft.py)
    resume: bool = True  # continue from the newest checkpoint of this run if there is one
    seed: int = 0
    PRESETS = {
        "tiny": dict(tokens_per_step=2048, micro_tokens=1024, steps=20, eval_every=10, eval_steps=4, save_every=10,
                     pack_tokens=4096),
        "colab": dict(tokens_per_step=131_072, micro_tokens=16_384, steps=1000, pack_tokens=16_384),
    }
    LIMITS = {
        "base_run": folder_name(), "run_name": folder_name(), "tokens_per_step": above(0),
        "micro_tokens": above(0), "steps": at_least(0), "lr_scale": above(0),
        "cooldown_frac": at_least(0, 1),
        "eval_every": above(0), "eval_steps": above(0), "save_every": above(0), "keep_checkpoints": at_least(0),
        "pack_tokens": above(0),
        "attention": ATTENTION_SETTING, "seed": at_least(0),
    }


cfg = configure(SFTConfig)
dist_info = sc.init_distributed()
device = dist_info.device
torch.manual_seed(cfg.seed)
log = print if dist_info.master else (lambda *args, **kwargs: None)
log(describe_config(cfg))
accum_steps = accumulation_steps(cfg.tokens_per_step, cfg.micro_tokens, dist_info.world_size)
run_dir = sc.artifact_dir("runs") / cfg.run_name
checkpoint_dir = sc.artifact_dir("checkpoints") / cfg.run_name
prepare_run_folders(checkpoint_dir, run_dir, cfg.run_name)  # the chat evals below write into run_dir
tokenizer_dir = sc.artifact_dir("tokenizer")
tokenizer = sc.Tokenizer.load(tokenizer_dir)

# %% [markdown]
# ## The pretrained model
# The newest checkpoint of `base_run`, in the compute dtype of this device, with the fastest attention backend
# that works here. Fine-tuning keeps its context length: conversations longer than that are cut.

# %%
base_path = cfg.checkpoint or run_checkpoint(cfg.base_run, "base_run", "03_pretrain")
model, base_checkpoint = sc.model_from_checkpoint(base_path, device, tokenizer, "03_pretrain")
compute_dtype = sc.pick_compute_dtype(device)
model.set_compute_dtype(compute_dtype)
backend = sc.pick_attention_backend(device, cfg.attention)
forward = torch.compile(model, dynamic=True) if cfg.compile and device.startswith("cuda") else model
seq_len = model.config.max_seq_len
log(f"base model {base_path} (step {base_checkpoint['step']}): {model.num_params()['total']:,} parameters, "
    f"context {seq_len}, attention {backend}")

# %% [markdown]
# ## The conversations
# Each batch is whole conversations from `shards/sft`, packed back to back up to `micro_tokens` tokens, their
# boundaries in `cu_seqlens` so that attention stays inside each conversation. There is no padding: every token
# computed is a real one. The targets are the next tokens where the loss mask is 1, and -1 (ignored) elsewhere.
# Under torchrun every rank packs the same rows and keeps every `world_size`-th: the ranks together train on the
# batches one process would take, and share one place in the data.

# %%
sft_dir = sc.require_artifact(sc.artifact_dir("shards") / "sft", made_by="02_sharding")
check_shards_tokenizer(sft_dir, tokenizer)
loader_args = dict(tokens=cfg.micro_tokens, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size,
                   max_seq_len=seq_len, rank=dist_info.rank, world_size=dist_info.world_size, device=device)
train_loader = sc.SFTLoader(sft_dir, "train", seed=cfg.seed, **loader_args)
val_loader = sc.SFTLoader(sft_dir, "val", shuffle=False, **loader_args)
epoch_tokens = int((train_loader.spans[:, 2] - train_loader.spans[:, 1] - 1).sum())
steps = cfg.steps or max(1, math.ceil(epoch_tokens / cfg.tokens_per_step))
example = train_loader.next_batch()
train_loader.load_state_dict({"epoch": 0, "cursor": 0})
log(f"{len(train_loader.spans):,} training conversations ({epoch_tokens:,} tokens, one epoch = "
    f"{epoch_tokens / cfg.tokens_per_step:.1f} steps); training for {steps} steps")
log(f"first batch: {len(example.cu_seqlens) - 1} conversations in {len(example.inputs)} tokens, longest "
    f"{example.max_seqlen}, {int((example.targets >= 0).sum())} trained tokens")

# %% [markdown]
# ## Look inside: what the model is trained on
# The first conversation of the first training shard, read back from `shards/sft` with its loss-mask side file,
# token by token: green tokens have mask 1 and are trained on (what the assistant writes, its calculator calls,
# `<|assistant_end|>`), grey ones are context only (the user's turns, the calculator's output, the special tokens
# that open a turn). The loader turns mask 0 into target -1, which the loss skips. Newlines show as `\n`, other
# characters outside ASCII as their escapes.

# %%
import numpy as np

first_sft_shard = sc.list_shards(sft_dir, "train")[0]
stream_ids = sc.read_shard(first_sft_shard, tokenizer.vocab_size)
stream_mask = sc.read_shard(sc.side_file(first_sft_shard, "mask"), kind="mask")
later_starts = np.flatnonzero(stream_ids[1:] == tokenizer.bos_id)
conversation_end = int(later_starts[0]) + 1 if len(later_starts) else len(stream_ids)
shown = min(conversation_end, 300)
line_chars, column, row = 150, 0, 0
rows = 1 + len(tokenizer.decode(stream_ids[:shown].tolist())) * 2 // line_chars  # room for the gaps between tokens
fig, ax = plt.subplots(figsize=(12, 0.6 + 0.22 * rows))
for token, trained in zip(stream_ids[:shown].tolist(), stream_mask[:shown].tolist()):
    text = tokenizer.decode([token]).encode("ascii", "backslashreplace").decode().replace("\n", "\\n")
    if column + len(text) > line_chars:
        column, row = 0, row + 1
    ax.text(column, -row, text, family="monospace", fontsize=8.5, va="center",
            bbox=dict(facecolor="palegreen" if trained else "whitesmoke", edgecolor="none", pad=1))
    column += len(text) + 1
ax.set(xlim=(0, line_chars), ylim=(-row - 0.7, 0.7), title=f"{shown} of {conversation_end} tokens; green: trained "
       f"on ({int(stream_mask[:conversation_end].sum())} tokens)")
ax.axis("off")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Before fine-tuning: the chat evals of the base model
# Multiple-choice tasks render the question as a user turn, then `<|assistant_start|>`, and read which allowed
# letter gets the highest logit (many questions per packed forward pass). Generative tasks let the model answer by
# greedy decoding with the calculator, then check the reply: the number after `####` for GSM8K and spelling, the
# unit tests for HumanEval, run in a sandboxed subprocess with a time limit, resource limits, and no network or
# writes outside a temporary folder. The base model has never seen the chat format, so expect random guessing.
# When resuming, the scores saved by the first run are reused.

# %%
tasks = load_chat_tasks(cfg)
log(describe_tasks(tasks))
before_file = run_dir / "chat_before.json"
if sc.all_ranks_agree(sc.latest_checkpoint(checkpoint_dir) is not None and cfg.resume and before_file.exists()):
    before = json.loads(before_file.read_text())
else:
    before = evaluate_chat(model, tokenizer, tasks, backend, device, cfg.pack_tokens)
    if dist_info.master:
        before_file.write_text(json.dumps(before, indent=1))
log(chat_table({"base": before}))

# %% [markdown]
# ## Optimizers and schedule
# The same optimizers as pretraining (Muon for the hidden matrices, AdamW for the rest), their learning rates
# scaled by `lr_scale`, flat and then decayed to zero over the last `cooldown_frac` of the steps.

# %%
optimizers = sc.build_optimizers(model, lr_scale=cfg.lr_scale)
loss_scaler = sc.LossScaler(compute_dtype, device)  # fp16 only (a T4); a plain optimizer step otherwise

# %% [markdown]
# ## Resume
# If this run already has a checkpoint, continue from it: the fine-tuned weights, the optimizer state and the
# loader's place in its shuffled epoch (the same on every rank, so any number of processes can resume). A damaged
# newest checkpoint is reported and the one before it taken. A run that has already reached `steps` trains nothing
# and keeps its results file. The checkpoint records the base model it was fine-tuned from (its file, step and a
# fingerprint of its weights) and the number of steps, which sets the learning-rate schedule: if `03_pretrain` has
# trained its base further (or started it over), or `--steps` changed, resuming is refused with what to do (a new
# `--run_name`, or `--checkpoint=` a file to start from), never a fine-tuned model of two bases or two schedules.

# %%
from notebooks.training import RunLog, check_finite_loss, save_checkpoint, start_training, weights_origin

base_origin = weights_origin(base_path, base_checkpoint)
start_step, complete, earlier_totals = start_training(checkpoint_dir, run_dir, model, optimizers, train_loader,
                                                      dist_info, "05_sft", cfg.run_name, steps, cfg.resume, log,
                                                      base_origin, tokenizer.fingerprint)
run_log = RunLog(run_dir, enabled=dist_info.master)

# %% [markdown]
# ## The training loop
# Each step runs `accum_steps` packed batches per rank. The loss of a step is the mean over its trained tokens:
# `sft_backward` (in `notebooks/sft.py`, beside this notebook) divides each batch's summed loss by the number of
# trained tokens in the whole step, on every rank together, so a batch of long answers and a batch of one-letter
# answers weigh by their tokens, and two GPUs make the very update one GPU makes from the same batches. The log line
# counts all tokens per second (all ranks) and the share that was trained on.

# %%
val_loss = float("nan")
val_batches_per_rank = -(-cfg.eval_steps // dist_info.world_size)  # the rows one process would score, shared out
train_seconds = earlier_totals.get("train_seconds", 0.0)  # the sessions before this one, from the checkpoint
for step in range(start_step, start_step if complete else steps + 1):
    last = step == steps
    if (step % cfg.eval_every == 0 or last) and (step > start_step or start_step == 0):  # resumed: done already
        val_loader.load_state_dict({"epoch": 0, "cursor": 0})
        val_loss = evaluate_sft_loss(forward, val_loader, val_batches_per_rank, backend)
        log(f"step {step:5d}/{steps} | val loss {val_loss:.4f}")
        run_log.log(step=step, val_loss=val_loss)
    if step > start_step and (step % cfg.save_every == 0 or last):
        saved = save_checkpoint(checkpoint_dir, step, model, optimizers, train_loader, cfg, dist_info,
                                {"val_loss": val_loss, "tokenizer_dir": str(tokenizer_dir), "origin": base_origin,
                                 "total_steps": steps, "totals": {"train_seconds": train_seconds}, "made_by": "05_sft",
                                 "tokenizer_fingerprint": tokenizer.fingerprint}, keep=cfg.keep_checkpoints)
        log(f"saved {saved}")
    if last:
        break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    sc.apply_schedule(optimizers, sc.lr_multiplier(step, steps, 0, cfg.cooldown_frac), sc.muon_momentum(step))
    batches = [train_loader.next_batch() for _ in range(accum_steps)]
    stats = sft_backward(forward, batches, backend, loss_scaler)
    loss_scaler.step(optimizers)
    train_loss, tokens = stats["loss"], stats["tokens"]
    check_finite_loss(train_loss, step + 1)
    step_seconds = time.time() - t0
    train_seconds += step_seconds
    log(f"step {step + 1:5d}/{steps} | loss {train_loss:.4f} | {tokens / step_seconds:,.0f} tok/s | "
        f"trained {stats['trained_tokens'] / tokens:.0%} | {step_seconds * 1000:.0f} ms | "
        f"elapsed {format_duration(train_seconds)} | epoch {train_loader.position['epoch']}")
    run_log.log(step=step + 1, loss=train_loss, tokens=tokens, trained_tokens=stats["trained_tokens"],
                tokens_per_second=tokens / step_seconds, train_seconds=train_seconds)

# %% [markdown]
# ## Curves
# Training loss per step (mean over the assistant's tokens) and the validation loss on held-out conversations.

# %%
if dist_info.master:
    records = run_log.read()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats per trained token)",
           title=f"supervised fine-tuning on the SFT mixture ({cfg.preset} preset)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=120)
    plt.show()

# %% [markdown]
# ## After fine-tuning: the chat evals again
# The same tasks and examples. ChatCORE, as nanochat defines it, is the mean accuracy above random guessing
# (centred like CORE), over the tasks run. The dashed lines in the chart mark random guessing.
#
# In the `tiny` preset the chart shows no learning, and that is expected: a CPU-sized model fine-tuned for a few
# steps on synthetic conversations cannot answer ARC, MMLU, GSM8K or HumanEval, so its scores stay at random
# guessing (or zero) before and after. The code path is the one the `colab` and `speedrun` presets run, where
# the bars move.

# %%
after = evaluate_chat(model, tokenizer, tasks, backend, device, cfg.pack_tokens)
stages = {"base": before, "sft": after}
log(chat_table(stages))
if dist_info.master:
    figure = plot_chat_results(stages, title=f"chat evals before and after SFT ({steps} steps)")
    figure.savefig(run_dir / "chat_evals.png", dpi=120)
    plt.show()

# %% [markdown]
# ## The summary file
# `runs/sft/summary.json` holds both evaluations, the losses and the run's settings; the checkpoint in
# `checkpoints/sft` is what `06_rl` and `07_chat` load.

# %%
results = {"base_checkpoint": str(base_path), "steps": steps, "preset": cfg.preset,
           "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
           "ranks": dist_info.world_size, "attention": backend, "final_val_loss": val_loss,
           "train_seconds": round(train_seconds, 1), "chat": stages, "config": dataclasses.asdict(cfg)}
if dist_info.master and not complete:
    (run_dir / "summary.json").write_text(json.dumps(results, indent=1))
    log(f"val loss {val_loss:.4f} | ChatCORE {before['chatcore']:.3f} -> {after['chatcore']:.3f} | "
        f"written {run_dir / 'summary.json'}")
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
