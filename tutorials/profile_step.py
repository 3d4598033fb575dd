"""Profile training steps of the GPT with torch.profiler: the table of the most expensive ops and a trace file.

    python3 tutorials/profile_step.py                                  # the tiny model on the CPU
    python3 tutorials/profile_step.py --preset=speedrun --steps=5      # the speedrun model on an H100

A step is what 03_pretrain runs for one micro-batch: forward over packed documents, backward, optimizer step
(Muon and AdamW). The batch is random tokens cut into documents of `doc_len` tokens: the data does not change
the cost, only the shapes do. Read tutorials/04_profiler_trace.md for what the table says.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import stackcore as sc
from notebooks.config import StackConfig, configure


@dataclass
class ProfileConfig(StackConfig):
    depth: int = 12
    model_dim: int = 0  # 0: 64 x depth
    head_dim: int = 128
    seq_len: int = 2048
    micro_tokens: int = 65_536  # tokens per step (one micro-batch)
    vocab_size: int = 32_768
    doc_len: int = 680  # tokens per packed document (about the mean of the speedrun's data)
    warmup: int = 3  # steps run before recording: torch.compile, the allocator and autotuning settle there
    steps: int = 3  # steps recorded
    compile: bool = True  # torch.compile the model on GPUs, as 03_pretrain does
    attention: str = "auto"
    fp8: bool = False  # fp8 matmuls where the GPU has them, as 03_pretrain's --fp8 (GPT.set_fp8)
    rows: int = 15  # rows of the op table
    PRESETS = {"tiny": dict(depth=4, model_dim=128, head_dim=32, seq_len=256, micro_tokens=1024, vocab_size=512,
                            doc_len=128, warmup=1, steps=2, compile=False),
               "colab": dict(depth=8, seq_len=1024, micro_tokens=16_384)}


cfg = configure(ProfileConfig)
device = sc.pick_device()
torch.manual_seed(0)
model = sc.GPT(sc.GPTConfig(vocab_size=cfg.vocab_size, depth=cfg.depth, model_dim=cfg.model_dim,
                            head_dim=cfg.head_dim, max_seq_len=cfg.seq_len)).to(device)
compute_dtype = sc.pick_compute_dtype(device)
model.set_compute_dtype(compute_dtype)
fp8 = cfg.fp8 and sc.fp8_supported(device, compute_dtype)
model.set_fp8(fp8)
backend = sc.pick_attention_backend(device, cfg.attention)
forward = torch.compile(model) if cfg.compile and device == "cuda" else model
optimizers = sc.build_optimizers(model)
loss_scaler = sc.LossScaler(compute_dtype, device)

tokens = torch.randint(0, cfg.vocab_size, (cfg.micro_tokens + 1,), device=device)
inputs, targets = tokens[:-1], tokens[1:]
doc_len = min(cfg.doc_len, cfg.seq_len)
cu_seqlens = torch.tensor([*range(0, cfg.micro_tokens, doc_len), cfg.micro_tokens], dtype=torch.int32, device=device)
windows = model.layer_windows()


def train_step() -> None:
    with record_function("## forward"):
        loss = forward(inputs, cu_seqlens, doc_len, targets, windows=windows, backend=backend)
    with record_function("## backward"):
        loss_scaler.scale(loss).backward()
    with record_function("## optimizer"):
        loss_scaler.step(optimizers)


def synchronize() -> None:
    if device == "cuda":
        torch.cuda.synchronize()


print(f"model: depth {cfg.depth}, {model.num_params()['total'] / 1e6:.2f} M parameters; "
      f"{cfg.micro_tokens} tokens per step in documents of {doc_len}; device {device}, {compute_dtype}, "
      f"attention {backend}, fp8 matmuls {'on' if fp8 else 'off'}, compile {forward is not model}")
for _ in range(cfg.warmup):
    train_step()
synchronize()
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
started = time.perf_counter()
with profile(activities=activities) as prof:
    for _ in range(cfg.steps):
        train_step()
    synchronize()
step_ms = (time.perf_counter() - started) * 1000 / cfg.steps

busiest = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
print(prof.key_averages().table(sort_by=busiest, row_limit=cfg.rows))
phases = {e.key: e.cpu_time_total / 1000 / cfg.steps for e in prof.key_averages() if e.key.startswith("## ")}
print(f"{step_ms:.1f} ms per profiled step (wall clock, profiler on); host time per phase: "
      + ", ".join(f"{key[3:]} {ms:.1f} ms" for key, ms in phases.items()))
trace = sc.artifact_dir("runs") / "profile" / "trace.json"
trace.parent.mkdir(parents=True, exist_ok=True)
prof.export_chrome_trace(str(trace))
print(f"trace: {trace} (open it in https://ui.perfetto.dev or chrome://tracing)")
