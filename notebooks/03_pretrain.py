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
# QK-norm, ReLU², value embeddings, U-net skips, soft-capped logits, the partial key offset), trained with Muon on
# packed whole documents.
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

from data.tokenizing import check_shards_tokenizer
from notebooks.config import (ATTENTION_SETTING, StackConfig, above, accumulation_steps, at_least, configure,
                              describe_config, folder_name, layer_list, one_of)
from notebooks.report import format_duration
from notebooks.training import batch_size_schedule, short_window_schedule, validation_steps


@dataclass
class PretrainConfig(StackConfig):
    depth: int = 12  # the one knob that sizes the model (width 64 x depth, heads of head_dim)
    model_dim: int = 0  # 0: 64 x depth
    head_dim: int = 128
    arch: str = "ours"  # ours | modded: adds modded-nanogpt's key offset and paired heads (modded_architecture)
    key_offset: bool = True  # modded-nanogpt's partial key offset in the long-window layers (sc.GPTConfig)
    smear: bool = False  # modded-nanogpt's smear: an embedding takes a gated share of its predecessor's (sc.GPTConfig)
    backout: bool = False  # modded-nanogpt's backout: the head reads the residual less a share of an early layer's
    paired_heads: str = ""  # layers with paired-head attention, comma-separated, e.g. 0,2,5,9 (sc.GPTConfig)
    seq_len: int = 2048  # longest document piece the model sees (longer documents are cut)
    tokens_per_step: int = 524_288  # global batch in tokens
    micro_tokens: int = 65_536  # tokens per forward/backward pass on one GPU
    steps: int = 2000
    warmup_steps: int = 0
    cooldown_frac: float = 0.4  # the last 40% of steps decay the learning rates linearly to zero
    lr_scale: float = 1.0  # multiplies every learning rate (sc.GPT.param_groups has the defaults)
    weight_decay: float = 0.0  # Muon's decoupled weight decay: a regulariser for runs that repeat their data
    cautious_weight_decay: bool = False  # decay only where Muon's update and the weight agree in sign (sc.Muon._decay)
    normuon: bool = False  # NorMuon: balance Muon's update across neurons by a second-moment estimate (sc.Muon)
    batch_start_tokens: int = 0  # 0: off; else the first step's batch, growing linearly to tokens_per_step
    batch_ramp_steps: int = 0  # steps over which the batch grows from batch_start_tokens (batch_size_schedule)
    window_schedule: bool = True  # grow the short attention window from 128 tokens to seq_len/2 during training
    eval_every: int = 250  # steps between validation bits-per-byte measurements (and at the end)
    eval_tokens: int = 2_097_152  # validation tokens per measurement
    eval_batch_tokens: int = 0  # tokens per validation forward pass; 0: micro_tokens (shorter rows cover a small
    # validation split without repeating it)
    save_every: int = 1000  # steps between checkpoints (and at the end)
    keep_checkpoints: int = 2  # the run's newest checkpoints kept on disk (0: all of them)
    attention: str = "auto"  # auto | flash | varlen | flex | sdpa
    compile: bool = True  # torch.compile the model's layers and loss on GPUs (GPT.compile_layers)
    fp8: bool = False  # fp8 matmuls in the blocks' linear layers and the head where the GPU has them (GPT.set_fp8)
    run_name: str = "pretrain"  # name of the run folder and checkpoint folder
    resume: bool = True  # continue from the newest checkpoint of this run if there is one
    wandb: bool = False  # log to Weights & Biases (needs `pip install wandb` and a login)
    seed: int = 0
    PRESETS = {
        "tiny": dict(depth=4, model_dim=128, head_dim=32, seq_len=256, tokens_per_step=4096, micro_tokens=2048,
                     steps=100, eval_every=25, eval_tokens=8192, save_every=50, compile=False),
        "colab": dict(depth=8, seq_len=1024, tokens_per_step=131_072, micro_tokens=16_384, steps=1000,
                      eval_every=100, eval_tokens=524_288, save_every=200),
        # the colab preset fits the GPU it finds (colab_gpu_tier, notebooks/config.py): the sizes above are an L4's;
        # on an H100 the colab preset is the speedrun
        "colab_t4": dict(depth=6, tokens_per_step=65_536, micro_tokens=8_192, steps=600, eval_tokens=262_144),
        "colab_a100": dict(depth=12, seq_len=2048, tokens_per_step=262_144, micro_tokens=32_768, steps=600),
        "node": dict(depth=20, steps=4000, save_every=500),
    }
    LIMITS = {
        "depth": above(0), "model_dim": at_least(0), "head_dim": above(0), "arch": one_of("ours", "modded"),
        "seq_len": above(0),
        "tokens_per_step": above(0), "micro_tokens": above(0), "steps": above(0),
        "warmup_steps": at_least(0), "cooldown_frac": at_least(0, 1), "lr_scale": above(0),
        "weight_decay": at_least(0), "batch_start_tokens": at_least(0), "batch_ramp_steps": at_least(0),
        "eval_every": above(0), "eval_tokens": above(0),
        "eval_batch_tokens": at_least(0), "save_every": above(0), "keep_checkpoints": at_least(0),
        "attention": ATTENTION_SETTING,
        "run_name": folder_name(), "seed": at_least(0),
    }

    def validate(self) -> None:
        """The switches that need another setting to do anything, and a batch ramp and warm-up that fit the run."""
        super().validate()
        if self.cautious_weight_decay and not self.weight_decay:
            raise sc.ConfigError("cautious_weight_decay=True does nothing with weight_decay=0: set --weight_decay")
        if self.batch_start_tokens and not self.batch_ramp_steps:
            raise sc.ConfigError(f"batch_start_tokens={self.batch_start_tokens} needs batch_ramp_steps > 0 (the "
                                 f"steps over which the batch grows to tokens_per_step)")
        if self.batch_start_tokens % self.micro_tokens or self.batch_start_tokens > self.tokens_per_step:
            raise sc.ConfigError(f"batch_start_tokens={self.batch_start_tokens} must be a multiple of micro_tokens "
                                 f"({self.micro_tokens}) and at most tokens_per_step ({self.tokens_per_step})")
        if self.batch_ramp_steps > self.steps:
            raise sc.ConfigError(f"batch_ramp_steps={self.batch_ramp_steps} is more than steps={self.steps}: the batch "
                                 f"would never reach tokens_per_step ({self.tokens_per_step})")
        flat_until = self.steps * (1 - self.cooldown_frac)  # where the cool-down starts (sc.lr_multiplier)
        if self.warmup_steps > flat_until:
            raise sc.ConfigError(f"warmup_steps={self.warmup_steps} runs past the start of the cool-down at step "
                                 f"{flat_until:g} (steps={self.steps}, cooldown_frac={self.cooldown_frac:g}): the "
                                 f"learning rates would never reach their peak; pass a smaller --warmup_steps")


cfg = configure(PretrainConfig)
dist_info = sc.init_distributed()
device = dist_info.device
torch.manual_seed(cfg.seed)
log = print if dist_info.master else (lambda *args, **kwargs: None)
log(describe_config(cfg))
accum_steps = accumulation_steps(cfg.tokens_per_step, cfg.micro_tokens, dist_info.world_size)
run_dir = sc.artifact_dir("runs") / cfg.run_name
checkpoint_dir = sc.artifact_dir("checkpoints") / cfg.run_name
tokenizer_dir = sc.artifact_dir("tokenizer")
tokenizer = sc.Tokenizer.load(tokenizer_dir)
token_bytes = torch.from_numpy(tokenizer.token_bytes())
log(f"device {device} x {dist_info.world_size} rank(s); {accum_steps} micro-step(s) of {cfg.micro_tokens} tokens per step")

# %% [markdown]
# ## The model
# Everything follows from `depth`: width is 64 × depth and heads are `head_dim` wide, as in nanochat. Weights stay
# in fp32 for the optimizer; matrix products run in bf16 on GPUs that have it (fp16 on a T4, whose loss is then
# scaled so that small gradients survive: `sc.LossScaler`). With `--fp8=true` and a GPU that has fp8 tensor cores
# (compute capability 8.9 and up: L4, H100, H200), every linear layer multiplies in fp8 in training (the attention's
# query, key, value and output projections, the MLP's two, the head), each operand scaled by its largest entry and
# the gradients in e5m2 (`sc.fp8_linear`); the weights stay fp32 and evaluation stays in the compute dtype. Where the
# GPU has no fp8, the log says so and training runs in the compute dtype. It is off by default: scaling and casting
# every operand adds passes over the activations, which the faster matmuls repay only when they are large enough
# (with the MLPs and head in fp8: slower at depth 12, `baselines/2026-11-30-d12-fp8`; a gain at depth 20,
# `baselines/2026-11-30-d20-fp8`). The attention backend is the fastest one that works here and matches the
# reference on a small check (see `sc.available_attention_backends`).
#
# `key_offset` (on by default) is modded-nanogpt's partial key offset: in the long-window layers, half of each
# key's channels come from the previous token, so one attention head can match "the token after X" in one step
# (`tutorials/06_kv_cache_and_left_out_tricks.md` shows why cached decoding stays exact; the gain on the books is in
# `baselines/2026-11-30-d12-switches`). `--key_offset=false` trains the model without it.
#
# Two more of modded-nanogpt's tricks are off by default, each a switch to measure. `--smear=true`: before the first
# layer, each token's embedding gets a share of the previous token's, the share a sigmoid gate on the embedding's first
# 12 channels times a learned scale that starts at zero; so the model has the previous token without spending an
# attention head on it. A document's first token takes nothing from the document before it, and the KV cache keeps
# each row's last embedding for the next token. `--backout=true`: before the final norm and the head, the residual
# stream loses a learned share of itself as it was after the first two thirds of the layers: what those layers wrote
# for the later layers to read need not reach the prediction. Both are off by default and unmeasured here, and
# `--arch=modded` leaves them off; modded's current model smears, and its backout has become part of another mechanism.

# %%
model_config = sc.GPTConfig(vocab_size=tokenizer.vocab_size, depth=cfg.depth, model_dim=cfg.model_dim,
                            head_dim=cfg.head_dim, max_seq_len=cfg.seq_len, key_offset=cfg.key_offset,
                            paired_head_layers=layer_list("paired_heads", cfg.paired_heads), smear=cfg.smear,
                            backout=cfg.backout)
if cfg.arch == "modded":
    model_config = model_config.modded_architecture()
model = sc.GPT(model_config).to(device)
compute_dtype = sc.pick_compute_dtype(device)
model.set_compute_dtype(compute_dtype)
fp8 = cfg.fp8 and sc.fp8_supported(device, compute_dtype)
model.set_fp8(fp8)
if cfg.fp8 and not fp8:
    log(f"fp8=True but {device} has no fp8 matmuls (a CUDA GPU of compute capability 8.9 or more, in bf16): "
        f"training runs in {compute_dtype}")
backend = sc.pick_attention_backend(device, cfg.attention)
forward = model.compile_layers() if cfg.compile and device.startswith("cuda") else model
params = model.num_params()
flops_per_token = model.flops_per_token(cfg.seq_len)
log(f"model: depth {cfg.depth}, width {model_config.dim}, {model_config.n_heads} heads, key offset "
    f"{model_config.key_offset}, paired heads in layers {list(model_config.paired_head_layers)}, smear "
    f"{model_config.smear}, backout {model_config.backout}; "
    f"{params['total'] / 1e6:.1f} M parameters ({params['matrices'] / 1e6:.1f} M in hidden matrices)")
log(f"attention backend: {backend} (available here: {sc.available_attention_backends(device)}); "
    f"compute dtype {compute_dtype}, fp8 matmuls {'on' if fp8 else 'off'}; "
    f"{flops_per_token / 1e9:.2f} GFLOP per token")

# %% [markdown]
# ## Look inside: one block, and where the parameters and FLOPs are
# The model is `depth` copies of one block (attention, then an MLP, each added to the residual stream after an
# RMS norm) between an embedding table and an output head. Its source is printed from `stackcore` below, as it
# runs. The model counts itself: `num_params()` groups the parameters by the optimizer that updates them (hidden
# matrices go to Muon, the rest to Adam), and `flops_per_token(seq_len)` is 6 FLOPs per matmul weight per token
# (forward and backward) plus attention, which grows with the context a query sees.

# %%
import inspect

log(inspect.getsource(sc.Block))
kinds = {kind: count for kind, count in params.items() if kind != "total"}
matmul_flops = 6 * (params["matrices"] + params["head"])  # embedding lookups are free
flops_parts = {"matmuls (6 x weights)": matmul_flops, "attention (QK and AV)": flops_per_token - matmul_flops}
for kind, count in kinds.items():
    log(f"{kind:>14}: {count:>12,} parameters ({count / params['total']:.1%})")
for part, flops in flops_parts.items():
    log(f"{part:>22}: {flops / 1e6:>10.2f} MFLOP per token ({flops / flops_per_token:.1%})")
fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
left.barh(list(kinds), list(kinds.values()), color="tab:blue")
left.set(xlabel="parameters", title=f"{params['total'] / 1e6:.1f} M parameters by kind")
right.barh(list(flops_parts), [f / 1e6 for f in flops_parts.values()], color="tab:orange")
right.set(xlabel="MFLOP per token (training)", title=f"FLOPs per token at seq_len {cfg.seq_len}")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Look inside: rotary angles
# Attention knows where tokens are only through rotary embeddings: each pair of dimensions of a query or key is
# rotated by an angle that grows with the token's position, at a frequency that falls from pair to pair. The score
# between a query and a key then depends on how far apart they are, never on where they sit. `sc.rotary_tables`
# builds the cos and sin tables; the fast pairs turn many times across a short context, the slow ones barely turn
# across the whole one.

# %%
cos, sin = sc.rotary_tables(cfg.seq_len, model_config.head_dim)
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3))
image = left.imshow(cos.T, aspect="auto", cmap="RdBu", interpolation="nearest")
left.set(xlabel="position", ylabel="dimension pair", title="cos(angle) per position and pair")
fig.colorbar(image, ax=left)
for pair in (0, model_config.head_dim // 8, model_config.head_dim // 4, model_config.head_dim // 2 - 1):
    right.plot(torch.atan2(sin[:, pair], cos[:, pair]).numpy(), lw=0.8, label=f"pair {pair}")
right.set(xlabel="position", ylabel="angle (wrapped to ±π)", title="rotation of four pairs")
right.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Optimizers and schedules
# Muon updates the hidden matrices with orthogonalised momentum; AdamW takes the embeddings, the head and the
# scalars. Learning rates stay flat, then fall linearly over the last `cooldown_frac` of training; Muon's momentum
# warms up from 0.85 to 0.95; the short attention window grows as training goes on (long context is learned late).
# With `batch_start_tokens` set, the batch grows too: the micro-batch stays, the number of micro-batches per step rises.

# %%
optimizers = sc.build_optimizers(model, weight_decay=cfg.weight_decay, lr_scale=cfg.lr_scale, normuon=cfg.normuon,
                                 cautious_weight_decay=cfg.cautious_weight_decay)
loss_scaler = sc.LossScaler(compute_dtype, device)  # fp16 only; a plain optimizer step otherwise


def schedule(step: int) -> list:
    sc.apply_schedule(optimizers, sc.lr_multiplier(step, cfg.steps, cfg.warmup_steps, cfg.cooldown_frac),
                      sc.muon_momentum(step))
    short = (short_window_schedule(step, cfg.steps, cfg.seq_len // 2) if cfg.window_schedule
             else cfg.seq_len // 2)
    return model.layer_windows(short)


def step_tokens(step: int) -> int:
    """The global batch of optimizer step `step`: tokens_per_step, or on the batch-size ramp towards it."""
    return batch_size_schedule(step, cfg.tokens_per_step, cfg.batch_start_tokens or cfg.tokens_per_step,
                               cfg.batch_ramp_steps, cfg.micro_tokens * dist_info.world_size)


# %% [markdown]
# ## Look inside: what Muon does to an update
# Gradients of weight matrices are nearly low-rank: a few directions dominate. Adam scales each entry by its own
# history; on its first step that is the entry's sign, and the update keeps the gradient's few dominant directions.
# Muon replaces the update by its nearest orthogonal matrix (`sc.orthogonalize`, a few Polar Express iterations):
# the same directions, each with the same strength, so rare directions learn as fast as common ones. Below, a
# made-up gradient for a matrix of the model's shape, its i-th direction 1/i as strong as the first, and one step of
# each optimizer from a fresh state on two copies of the matrix (`sc.Muon` with the source printed, and AdamW); the
# singular values of the updates, each scaled to its largest, tell the difference.

# %%
log(inspect.getsource(sc.Muon._orthogonal_update))
shape = model.parameter_kinds()["matrices"][0].shape
generator = torch.Generator().manual_seed(0)
directions = [torch.linalg.qr(torch.randn(n, n, generator=generator))[0] for n in shape]
strengths = 1 / torch.arange(1, min(shape) + 1, dtype=torch.float32)  # direction i is 1/i as strong as the first
gradient = directions[0][:, :len(strengths)] @ torch.diag(strengths) @ directions[1][:, :len(strengths)].T
updates = {}
optimizers_to_compare = (("Muon", lambda w: sc.Muon([w], lr=1.0, distributed=False)),  # every rank steps alone
                         ("Adam", lambda w: torch.optim.AdamW([w], lr=1.0, weight_decay=0)))
for name, make in optimizers_to_compare:
    weight = torch.nn.Parameter(torch.zeros(shape))
    weight.grad = gradient.clone()
    make(weight).step()
    updates[name] = -weight.detach()
fig, ax = plt.subplots(figsize=(6, 3))
for name, matrix in (("gradient", gradient), *updates.items()):
    values = torch.linalg.svdvals(matrix)
    ax.plot((values / values[0]).numpy(), label=name)
ax.set(yscale="log", xlabel="singular value index", ylabel="relative to the largest",
       title=f"one update of a {shape[0]}x{shape[1]} matrix")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Look inside: the schedules
# `schedule(step)` above sets every learning rate and Muon's momentum for a step and returns the attention window
# of every layer. Called for every step of this run and read back from the optimizers, it draws itself: the
# learning rates stay flat and fall to zero over the last `cooldown_frac`; Muon's momentum warms up; the short
# window grows (the long layers always see the whole document); `step_tokens(step)` draws the batch size.

# %%
muon = next(o for o in optimizers if isinstance(o, sc.Muon))
traced = []
for step in range(cfg.steps + 1):
    windows = schedule(step)
    group = muon.param_groups[0]
    traced.append((group["lr"] / group["initial_lr"], group["momentum"], min(w or cfg.seq_len for w in windows),
                   step_tokens(step)))
schedule(0)  # leave the optimizers as the first step wants them
fig, axes = plt.subplots(1, 4, figsize=(15, 3))
for ax, values, label in zip(axes, zip(*traced), ("learning-rate multiplier", "Muon momentum",
                                                  "short attention window (tokens)", "batch (tokens per step)")):
    ax.plot(values)
    ax.set(xlabel="step", title=label)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The data
# Each rank reads `micro_tokens` tokens that start at a `<|bos|>`: whole documents packed into one row, their
# boundaries in `cu_seqlens`, so attention never crosses from one document into the next.

# %%
shard_dir = sc.require_artifact(sc.artifact_dir("shards") / "pretrain", made_by="02_sharding")
check_shards_tokenizer(shard_dir, tokenizer)
loader_args = dict(tokens=cfg.micro_tokens, bos_id=tokenizer.bos_id, vocab_size=tokenizer.vocab_size,
                   max_doc_len=cfg.seq_len, rank=dist_info.rank, world_size=dist_info.world_size, device=device)
train_loader = sc.PretrainLoader(shard_dir, "train", **loader_args)
val_loader = sc.PretrainLoader(shard_dir, "val",
                               **{**loader_args, "tokens": cfg.eval_batch_tokens or cfg.micro_tokens})
val_steps = validation_steps(cfg.eval_tokens, val_loader, dist_info.world_size)
example = train_loader.next_batch()
train_loader.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})
log(f"first batch: {len(example.cu_seqlens) - 1} documents in {len(example.inputs)} tokens, "
    f"longest {example.max_seqlen}")


def validation_bpb() -> float:
    val_loader.load_state_dict({"shard": 0, "offset": 0, "epoch": 0})  # the same validation tokens every time
    return sc.evaluate_bpb(forward, val_loader, val_steps, token_bytes.to(device), backend)


# %% [markdown]
# ## Look inside: a packed batch
# Two short documents, each starting with `<|bos|>`, packed into one row as the loader packs them: no padding, and
# `cu_seqlens` (from `sc.document_boundaries`) holds where each document starts and the row ends. Attention is causal
# and stays inside a document, so the mask is block-diagonal: each block a lower triangle. The backend never builds
# that mask; it takes `cu_seqlens` and runs each document on its own, which the cell checks (the packed row gives
# the same output as each document alone). On the right, the documents of the first real batch.

# %%
documents = ["The cat sat on the mat.", "Rain fell all day."]
packed_ids = np.concatenate([tokenizer.encode(text, prepend_bos=True) for text in documents])
toy_cu = torch.from_numpy(sc.document_boundaries(packed_ids, tokenizer.bos_id, cfg.seq_len))
length = len(packed_ids)
doc_of = sc.document_ids(toy_cu, length)
toy_mask = (doc_of[:, None] == doc_of[None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
log(f"{length} tokens: {[tokenizer.decode([t]) for t in packed_ids]}")
log(f"cu_seqlens {toy_cu.tolist()}; positions inside documents {sc.positions_in_documents(toy_cu, length).tolist()}")
q, k, v = (torch.randn(length, 2, model_config.head_dim, device=device, dtype=compute_dtype) for _ in range(3))
packed_out = sc.attention(q, k, v, toy_cu.to(device), int(toy_cu.diff().max()), backend=backend)
alone_out = torch.cat([sc.attention(q[a:b], k[a:b], v[a:b], torch.tensor([0, b - a], device=device, dtype=torch.int32),
                                    b - a, backend=backend) for a, b in zip(toy_cu[:-1].tolist(), toy_cu[1:].tolist())])
log(f"packed against each document alone: largest difference {(packed_out - alone_out).abs().max().item():.1e}")
fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.imshow(toy_mask.numpy(), cmap="gray", interpolation="nearest")
left.set(xlabel="key position", ylabel="query position", title=f"block-diagonal causal mask, cu_seqlens {toy_cu.tolist()}")
right.bar(range(len(example.cu_seqlens) - 1), example.cu_seqlens.diff().cpu().numpy())
right.set(xlabel="document in the batch", ylabel="tokens",
          title=f"first batch: {len(example.cu_seqlens) - 1} documents in {len(example.inputs)} tokens")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Resume
# If this run already has a checkpoint, pick up where it stopped: weights, optimizer state and the loader's
# position, so the continuation is the same as an uninterrupted run (also under another number of processes). A
# damaged newest checkpoint is reported and the one before it taken. The checkpoint carries the training time of
# the sessions before, so the summary counts the whole run. A run that has already reached `steps` trains nothing and
# keeps its summary. `steps` is fixed when a run starts: the learning rates follow it, so a larger `--steps` would
# stretch a schedule that has cooled to zero and raise the rates again; a resume with another `--steps` is refused,
# and a longer run is a new `--run_name`. Only the newest `keep_checkpoints` checkpoints stay on disk.

# %%
from notebooks.training import RunLog, check_finite_loss, save_checkpoint, start_training

start_step, complete, earlier_totals = start_training(checkpoint_dir, run_dir, model, optimizers, train_loader,
                                                      dist_info, "03_pretrain", cfg.run_name, cfg.steps, cfg.resume,
                                                      log, tokenizer_fingerprint=tokenizer.fingerprint)
wandb_run = None
if cfg.wandb and dist_info.master:
    import wandb

    wandb_run = wandb.init(project="decoderstack", name=cfg.run_name, config=dataclasses.asdict(cfg))
run_log = RunLog(run_dir, enabled=dist_info.master, wandb_run=wandb_run)

# %% [markdown]
# ## The training loop
# One optimizer step = `accum_steps` forward/backward passes per rank (fewer on a batch-size ramp). The log line
# shows the loss, throughput, MFU (model FLOPs over the GPU's peak) and the time left. The first step is slow on a
# GPU while `torch.compile` builds the kernels: one graph per kind of block, reused by every layer of that kind
# (`GPT.compile_layers`), so neither the depth, the growing attention window nor the growing batch adds
# compilations. Steady-state throughput leaves that step out.

# %%
# the GPU's dense bf16 tensor-core peak (fp16 on a T4) from its datasheet; none on the CPU or an unknown GPU
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12, "T4": 65e12}
gpu_name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
peak = next((flops for key, flops in PEAK_FLOPS.items() if key in gpu_name), None)
earlier_seconds = earlier_totals.get("train_seconds", 0.0)  # the sessions before this one, from the checkpoint
train_seconds, tokens_seen = earlier_seconds, sum(map(step_tokens, range(start_step)))
step_times, step_rates = [], []  # seconds and tokens per second of each optimizer step; the first one compiles
val_bpb = float("nan")


def peak_memory_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.startswith("cuda") else None


for step in range(start_step, start_step if complete else cfg.steps + 1):
    last = step == cfg.steps
    if (step % cfg.eval_every == 0 or last) and (step > start_step or start_step == 0):  # resumed: done already
        val_bpb = validation_bpb()
        log(f"step {step:5d}/{cfg.steps} | val bpb {val_bpb:.4f}")
        run_log.log(step=step, val_bpb=val_bpb, tokens=tokens_seen, train_seconds=train_seconds)
    if step > start_step and (step % cfg.save_every == 0 or last):
        saved = save_checkpoint(checkpoint_dir, step, model, optimizers, train_loader, cfg, dist_info,
                                {"val_bpb": val_bpb, "tokenizer_dir": str(tokenizer_dir), "total_steps": cfg.steps,
                                 "totals": {"train_seconds": train_seconds}, "made_by": "03_pretrain",
                                 "tokenizer_fingerprint": tokenizer.fingerprint}, keep=cfg.keep_checkpoints)
        log(f"saved {saved}")
    if last:
        break
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.time()
    windows = schedule(step)
    batch_tokens = step_tokens(step)
    micro_steps = batch_tokens // (cfg.micro_tokens * dist_info.world_size)
    for _ in range(micro_steps):
        batch = train_loader.next_batch()
        loss = forward(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, windows=windows,
                       backend=backend)
        loss_scaler.scale(loss / micro_steps).backward()
    loss_scaler.step(optimizers)
    train_loss = loss.item()  # one sync per step: the loss of the last micro-batch
    check_finite_loss(train_loss, step + 1)
    step_seconds = time.time() - t0
    step_times.append(step_seconds)
    if len(step_times) == 1:  # keep what set-up and compilation left behind out of every later garbage collection
        gc.collect()
        gc.freeze()
    train_seconds += step_seconds
    tokens_seen += batch_tokens
    tokens_per_second = batch_tokens / step_seconds
    step_rates.append(tokens_per_second)
    mfu = flops_per_token * tokens_per_second / (peak * dist_info.world_size) if peak else None  # no peak on a CPU
    remaining = (cfg.steps - step - 1) * (train_seconds - earlier_seconds) / (step + 1 - start_step)
    log(f"step {step + 1:5d}/{cfg.steps} | loss {train_loss:.4f} | {tokens_per_second:,.0f} tok/s | "
        f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | {step_seconds * 1000:.0f} ms | "
        f"elapsed {format_duration(train_seconds)} | left {format_duration(remaining)} | "
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
    fig.suptitle(f"{params['total']:,} parameters, {cfg.preset} preset, {cfg.tokens_per_step:,} tokens per step")
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=120)
    plt.show()

# %% [markdown]
# ## Summary
# The final checkpoint in `STACK_HOME/checkpoints/<run>` is what `04_core_eval`, `05_sft` and `07_chat` load.
# Throughput is the steady state: the median tokens per second of the steps after the first, which compiles (timed
# apart as `first_step_seconds`). MFU counts 6 FLOPs per matmul parameter plus attention as if every document were
# `seq_len` tokens long at the final windows; packed documents are shorter, so its attention term is an upper bound.
# `train_seconds` adds up the training steps of every session of a resumed run; the throughput figures are the
# last session's.

# %%
steady_step = float(np.median(step_times[1:])) if len(step_times) > 1 else None
steady_rate = float(np.median(step_rates[1:])) if len(step_rates) > 1 else None
summary = {
    "run": cfg.run_name, "preset": cfg.preset, "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
    "ranks": dist_info.world_size, "attention": backend, "parameters": params["total"], "steps": cfg.steps,
    "tokens": tokens_seen, "final_val_bpb": round(val_bpb, 4), "train_seconds": round(train_seconds, 1),
    "first_step_seconds": round(step_times[0], 2) if step_times else None,
    "step_seconds": round(steady_step, 4) if steady_step else None,
    "tokens_per_second": round(steady_rate) if steady_rate else None,
    "mfu": round(flops_per_token * steady_rate / (peak * dist_info.world_size), 4) if steady_rate and peak else None,
    "peak_memory_GB": peak_memory_gb(),
}
if dist_info.master and not complete:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    log(json.dumps(summary, indent=1))
if torch.distributed.is_initialized():
    torch.distributed.destroy_process_group()
