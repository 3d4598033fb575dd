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
# # 03 · Pretrain the model: the speedrun
#
# The heart of the stack. A GPT with modded-nanogpt's ideas that still decode with a KV cache (rotary embeddings,
# QK-norm, ReLU², value embeddings, U-net skips, soft-capped logits), trained with Muon on packed whole documents.
#
# Steps:
# 1. set-up: config, devices, and (under torchrun) the process group;
# 2. build the model and look at its size;
# 3. the optimizers and schedules;
# 4. the data: BOS-aligned packed batches from the shards of `02_sharding`;
# 5. the training loop, in view: validation bits per byte every `eval_every` steps, a log line per step,
#    checkpoints that let you stop and resume;
# 6. plots and a summary.
#
# Headless: `python notebooks/03_pretrain.py --depth=20`; on a node:
# `torchrun --nproc_per_node=8 notebooks/03_pretrain.py --preset=node`.

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
# `tokens_per_step` is the global batch; each rank runs forward/backward passes of `micro_tokens` tokens and
# accumulates gradients until the global batch is reached.

# %%
import dataclasses
import gc
import json
import time
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch


@dataclass
class PretrainConfig(sc.StackConfig):
    depth: int = 12  # the one knob that sizes the model (width 64 x depth, heads of head_dim)
    model_dim: int = 0  # 0: 64 x depth
    head_dim: int = 128
    seq_len: int = 2048  # longest document piece the model sees (longer documents are cut)
    tokens_per_step: int = 524_288  # global batch in tokens
    micro_tokens: int = 65_536  # tokens per forward/backward pass on one GPU
    steps: int = 2000
    warmup_steps: int = 0
    cooldown_frac: float = 0.4  # the last 40% of steps decay the learning rates linearly to zero
    lr_scale: float = 1.0  # multiplies every learning rate (sc.GPT.param_groups has the defaults)
    weight_decay: float = 0.0  # Muon's decoupled weight decay: a regulariser for runs that repeat their data
    window_schedule: bool = True  # grow the short attention window from 128 tokens to seq_len/2 during training
    eval_every: int = 250  # steps between validation bits-per-byte measurements (and at the end)
    eval_tokens: int = 2_097_152  # validation tokens per measurement
    eval_batch_tokens: int = 0  # tokens per validation forward pass; 0: micro_tokens (shorter rows cover a small
    # validation split without repeating it)
    save_every: int = 1000  # steps between checkpoints (and at the end)
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    compile: bool = True  # torch.compile the model's layers and loss on GPUs (GPT.compile_layers)
    fp8: bool = False  # fp8 matmuls in the MLPs and the head where the GPU has them (GPT.set_fp8); on in the speedrun
    run_name: str = "pretrain"  # name of the run folder and checkpoint folder
    resume: bool = True  # continue from the newest checkpoint of this run if there is one
    wandb: bool = False  # log to Weights & Biases (needs `pip install wandb` and a login)
    seed: int = 0
    PRESETS = {
        "tiny": dict(depth=4, model_dim=128, head_dim=32, seq_len=256, tokens_per_step=4096, micro_tokens=2048,
                     steps=100, eval_every=25, eval_tokens=8192, save_every=50, compile=False),
        "colab": dict(depth=8, seq_len=1024, tokens_per_step=131_072, micro_tokens=16_384, steps=1000,
                      eval_every=100, eval_tokens=524_288, save_every=200),
        # the colab preset fits the GPU it finds (sc.colab_gpu_tier): the sizes above are an L4's; on an H100 the
        # colab preset is the speedrun
        "colab_t4": dict(depth=6, tokens_per_step=65_536, micro_tokens=8_192, steps=600, eval_tokens=262_144),
        "colab_a100": dict(depth=12, seq_len=2048, tokens_per_step=262_144, micro_tokens=32_768, steps=600),
        "speedrun": dict(fp8=True),
        "node": dict(depth=20, steps=4000, save_every=500, fp8=True),
    }


cfg = sc.configure(PretrainConfig)
dist_info = sc.init_distributed()
device = dist_info.device
torch.manual_seed(cfg.seed)
log = print if dist_info.master else (lambda *args, **kwargs: None)
log(sc.describe_config(cfg))
accum_steps = sc.accumulation_steps(cfg.tokens_per_step, cfg.micro_tokens, dist_info.world_size)
run_dir = sc.artifact_dir("runs") / cfg.run_name
checkpoint_dir = sc.artifact_dir("checkpoints") / cfg.run_name
tokenizer_dir = sc.artifact_dir("tokenizer")
token_bytes = torch.from_numpy(np.load(sc.require_artifact(tokenizer_dir / sc.TOKEN_BYTES, "01_tokenizer")))
tokenizer = sc.Tokenizer.load(tokenizer_dir)
log(f"device {device} x {dist_info.world_size} rank(s); {accum_steps} micro-step(s) of {cfg.micro_tokens} tokens per step")

# %% [markdown]
# ## The model
# Everything follows from `depth`: width is 64 × depth and heads are `head_dim` wide, as in nanochat. Weights stay
# in fp32 for the optimizer; matrix products run in bf16 on GPUs that have it (fp16 on a T4, whose loss is then
# scaled so that small gradients survive: `sc.LossScaler`). With `fp8` (on in the speedrun and node presets) and a
# GPU that has fp8 tensor cores (compute capability 8.9 and up: L4, H100, H200), the MLPs' and the head's matrix
# products run in fp8 in training, each operand scaled by its largest entry (`sc.fp8_linear`); `--fp8=false` turns
# it off. The attention backend is the fastest one that works here and matches the reference on a small check (see
# `sc.available_attention_backends`).

# %%
model_config = sc.GPTConfig(vocab_size=tokenizer.vocab_size, depth=cfg.depth, model_dim=cfg.model_dim,
                            head_dim=cfg.head_dim, max_seq_len=cfg.seq_len)
model = sc.GPT(model_config).to(device)
compute_dtype = sc.pick_compute_dtype(device)
model.set_compute_dtype(compute_dtype)
fp8 = cfg.fp8 and sc.fp8_supported(device, compute_dtype)
model.set_fp8(fp8)
backend = sc.pick_attention_backend(device, cfg.attention)
forward = model.compile_layers() if cfg.compile and device.startswith("cuda") else model
params = model.num_params()
flops_per_token = model.flops_per_token(cfg.seq_len)
log(f"model: depth {cfg.depth}, width {model_config.dim}, {model_config.n_heads} heads; "
    f"{params['total'] / 1e6:.1f} M parameters ({params['matrices'] / 1e6:.1f} M in hidden matrices)")
log(f"attention backend: {backend} (available here: {sc.available_attention_backends(device)}); "
    f"compute dtype {compute_dtype}, fp8 matmuls {'on' if fp8 else 'off'}; "
    f"{flops_per_token / 1e9:.2f} GFLOP per token")

# %% [markdown]
# ## Optimizers and schedules
# Muon updates the hidden matrices with orthogonalised momentum; AdamW takes the embeddings, the head and the
# scalars. Learning rates stay flat, then fall linearly over the last `cooldown_frac` of training; Muon's momentum
# warms up from 0.85 to 0.95; the short attention window grows as training goes on (long context is learned late).

# %%
optimizers = sc.build_optimizers(model, weight_decay=cfg.weight_decay, lr_scale=cfg.lr_scale)
loss_scaler = sc.LossScaler(compute_dtype, device)  # fp16 only; a plain optimizer step otherwise


def schedule(step: int) -> list:
    sc.apply_schedule(optimizers, sc.lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.cooldown_frac),
                      sc.muon_momentum(step))
    short = (sc.short_window_schedule(step, cfg.steps, cfg.seq_len // 2) if cfg.window_schedule
             else cfg.seq_len // 2)
    return model.layer_windows(short)


# %% [markdown]
# ## The data
# Each rank reads `micro_tokens` tokens that start at a `<|bos|>`: whole documents packed into one row, their
# boundaries in `cu_seqlens`, so attention never crosses from one document into the next.

# %%
shard_dir = sc.require_artifact(sc.artifact_dir("shards") / "pretrain", made_by="02_sharding")
loader_args = dict(tokens=cfg.micro_tokens, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size,
                   max_doc_len=cfg.seq_len, rank=dist_info.rank, world_size=dist_info.world_size, device=device)
train_loader = sc.PretrainLoader(shard_dir, "train", **loader_args)
val_loader = sc.PretrainLoader(shard_dir, "val",
                               **{**loader_args, "tokens": cfg.eval_batch_tokens or cfg.micro_tokens})
val_steps = max(1, cfg.eval_tokens // (val_loader.tokens * dist_info.world_size))
example = train_loader.next_batch()
train_loader.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})
log(f"first batch: {len(example.cu_seqlens) - 1} documents in {len(example.inputs)} tokens, "
    f"longest {example.max_seqlen}")


def validation_bpb() -> float:
    val_loader.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})  # the same validation tokens every time
    return sc.evaluate_bpb(forward, val_loader, val_steps, token_bytes.to(device), backend)


# %% [markdown]
# ## Resume
# If this run already has a checkpoint, pick up where it stopped: weights, optimizer state and the loader's
# position, so the continuation is the same as an uninterrupted run.

# %%
start_step = 0
latest = sc.latest_checkpoint(checkpoint_dir) if cfg.resume else None
if latest is not None:
    start_step = sc.resume_training(latest, model, optimizers, train_loader, dist_info)
    log(f"resumed from {latest} at step {start_step}")
elif dist_info.master:
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
wandb_run = None
if cfg.wandb and dist_info.master:
    import wandb

    wandb_run = wandb.init(project="decoderstack", name=cfg.run_name, config=dataclasses.asdict(cfg))
run_log = sc.RunLog(run_dir, enabled=dist_info.master, wandb_run=wandb_run)

# %% [markdown]
# ## The training loop
# One optimizer step = `accum_steps` forward/backward passes per rank. The log line shows the loss, throughput,
# MFU (model FLOPs over the GPU's peak) and the time left. The first step is slow on a GPU while `torch.compile`
# builds the kernels: one graph per kind of block, reused by every layer of that kind (`GPT.compile_layers`), so
# neither the depth nor the growing attention window adds compilations. Steady-state throughput leaves that step out.

# %%
peak = sc.peak_flops(device)
train_seconds, tokens_seen = 0.0, start_step * cfg.tokens_per_step
step_times = []  # seconds per optimizer step of this process; the first one includes the compilation
val_bpb = float("nan")


def peak_memory_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None


for step in range(start_step, cfg.steps + 1):
    last = step == cfg.steps
    if step % cfg.eval_every == 0 or last:
        val_bpb = validation_bpb()
        log(f"step {step:5d}/{cfg.steps} | val bpb {val_bpb:.4f}")
        run_log.log(step=step, val_bpb=val_bpb, tokens=tokens_seen, train_seconds=train_seconds)
    if step > start_step and (step % cfg.save_every == 0 or last):
        saved = sc.save_checkpoint(checkpoint_dir, step, model, optimizers, train_loader, cfg, dist_info,
                                   {"val_bpb": val_bpb, "tokenizer_dir": str(tokenizer_dir)})
        log(f"saved {saved}")
    if last:
        break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    windows = schedule(step)
    for _ in range(accum_steps):
        batch = train_loader.next_batch()
        loss = forward(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, windows=windows,
                       backend=backend)
        loss_scaler.scale(loss / accum_steps).backward()
    loss_scaler.step(optimizers)
    train_loss = loss.item()  # one sync per step: the loss of the last micro-batch
    step_seconds = time.time() - t0
    step_times.append(step_seconds)
    if len(step_times) == 1:  # keep what set-up and compilation left behind out of every later garbage collection
        gc.collect()
        gc.freeze()
    train_seconds += step_seconds
    tokens_seen += cfg.tokens_per_step
    tokens_per_second = cfg.tokens_per_step / step_seconds
    mfu = flops_per_token * tokens_per_second / (peak * dist_info.world_size) if peak else None  # no peak on a CPU
    remaining = (cfg.steps - step - 1) * train_seconds / (step + 1 - start_step)
    log(f"step {step + 1:5d}/{cfg.steps} | loss {train_loss:.4f} | {tokens_per_second:,.0f} tok/s | "
        f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | {step_seconds * 1000:.0f} ms | "
        f"elapsed {sc.format_duration(train_seconds)} | left {sc.format_duration(remaining)} | "
        f"epoch {train_loader.position['epoch']}")
    run_log.log(step=step + 1, loss=train_loss, tokens_per_second=tokens_per_second, mfu=mfu, step_seconds=step_seconds,
                tokens=tokens_seen, train_seconds=train_seconds, peak_memory_GB=peak_memory_gb())

# %% [markdown]
# ## Curves
# Training loss per step and validation bits per byte. Bits per byte divides the loss by the bytes each token
# stands for, so it compares across tokenizers and vocabulary sizes.

# %%
if dist_info.master:
    records = run_log.read()
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_bpb" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.5))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    left.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    right.plot([r["step"] for r in val], [r["val_bpb"] for r in val], marker="o")
    right.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=120)
    plt.show()

# %% [markdown]
# ## Summary
# The final checkpoint in `STACK_HOME/checkpoints/<run>` is what `04_core_eval`, `05_sft` and `07_chat` load.
# Throughput is the steady state: the median step after the first, which compiles (timed apart as
# `first_step_seconds`). MFU counts 6 FLOPs per matmul parameter plus attention as if every document were `seq_len`
# tokens long at the final windows; packed documents are shorter, so its attention term is an upper bound.

# %%
steady_step = float(np.median(step_times[1:])) if len(step_times) > 1 else None
summary = {
    "run": cfg.run_name, "preset": cfg.preset, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    "ranks": dist_info.world_size, "attention": backend, "parameters": params["total"], "steps": cfg.steps,
    "tokens": tokens_seen, "final_val_bpb": round(val_bpb, 4), "train_seconds": round(train_seconds, 1),
    "first_step_seconds": round(step_times[0], 2) if step_times else None,
    "step_seconds": round(steady_step, 4) if steady_step else None,
    "tokens_per_second": round(cfg.tokens_per_step / steady_step) if steady_step else None,
    "mfu": round(flops_per_token * cfg.tokens_per_step / steady_step / (peak * dist_info.world_size), 4)
    if steady_step and peak else None,
    "peak_memory_GB": peak_memory_gb(),
}
if dist_info.master:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(json.dumps(summary, indent=1))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
