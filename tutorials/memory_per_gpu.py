"""What training needs in memory per GPU at each depth: an estimate counted from the model's own sizes
(memory_estimate), printed as the Markdown table of tutorials/02_headless_and_torchrun.md.

    python3 tutorials/memory_per_gpu.py
    python3 tutorials/memory_per_gpu.py --depths=12,16,20 --micro_tokens=32768 --ranks=2

The models are built on the meta device (sizes without storage), so this runs in a second on any machine.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataclasses import dataclass

import torch

import stackcore as sc
from notebooks.config import StackConfig, above, configure
from notebooks.report import markdown_table

GIB = 2**30


@dataclass
class MemoryConfig(StackConfig):
    depths: str = "12,20,26"  # comma-separated model depths (the default vocabulary and context of GPTConfig)
    micro_tokens: int = 65_536  # tokens per forward/backward pass on one GPU (the speedrun and node presets')
    small_micro_tokens: int = 16_384  # the last column: a smaller pass, with more accumulation steps per step
    ranks: int = 8  # GPUs sharing Muon's momentum in the multi-GPU column
    LIMITS = {"micro_tokens": above(0), "small_micro_tokens": above(0), "ranks": above(0)}


def memory_estimate(model: sc.GPT, micro_tokens: int, world_size: int = 1, dtype: torch.dtype = torch.bfloat16,
                    chunk_tokens: int = 8192) -> dict[str, int]:
    """An estimate of the bytes one GPU needs to train, counted from the model's own sizes, for passes of
    `micro_tokens` tokens among `world_size` ranks. The terms are added as if alive together (an upper bound:
    Muon's step buffers come after the activations are freed):

    - weights, gradients: fp32 master copies, 4 bytes per parameter each;
    - adam_state: AdamW's two fp32 moments for embeddings, value embeddings, head and scalars;
    - muon_momentum: one fp32 buffer per matrix, kept only for this rank's share of each shape group;
    - muon_step: the largest shape group's stacked gradients and gathered updates (fp32), alive during step();
    - weight_copies: the `dtype` copies of the matrices and head that CastedLinear makes and autograd keeps;
    - activations: what autograd keeps per token in `dtype`, from the code: per layer the block input (1 x dim),
      the attention's norm output, q and k before and after QK-norm and rotary, v and its output (8 x dim), the
      MLP's input and norm output (2 x dim) and its hidden activation before and after squaring
      (2 x mlp_ratio x dim); plus the embeddings (x0 and one per value-embedding table) and the final norm;
    - logits: one chunk of fp32 logits and their gradient in the fused cross-entropy.

    Not counted: the CUDA context and allocator slack, torch.compile's workspaces, norm statistics, fragmentation.
    torch.compile fuses some activations away; the SDPA reference (CPU, T4) also keeps each document's attention
    matrix. Shrinking micro_tokens (the accumulation steps keep the global batch) is what lowers the peak."""
    counts = model.num_params()
    config, fp32, elem = model.config, 4, torch.empty((), dtype=dtype).element_size()
    groups: dict[tuple[int, ...], list[int]] = {}
    for p in model.parameter_kinds()["matrices"]:
        groups.setdefault(tuple(p.shape), []).append(p.numel())
    shares = [-(-len(sizes) // world_size) * sizes[0] for sizes in groups.values()]  # ceil share per group
    padded = [-(-len(sizes) // world_size) * world_size * sizes[0] for sizes in groups.values()]
    per_layer = 1 + 8 + 2 + 2 * config.mlp_ratio
    per_token = config.depth * per_layer + 1 + config.value_embed_tables + 1
    estimate = {
        "weights": fp32 * counts["total"],
        "gradients": fp32 * counts["total"],
        "adam_state": 2 * fp32 * (counts["total"] - counts["matrices"]),
        "muon_momentum": fp32 * sum(shares),
        "muon_step": 2 * fp32 * max(padded, default=0),
        "weight_copies": elem * (counts["matrices"] + counts["head"]) if dtype != torch.float32 else 0,
        "activations": elem * micro_tokens * config.dim * per_token,
        "logits": 2 * fp32 * min(micro_tokens, chunk_tokens) * config.vocab_size,
    }
    estimate["total"] = sum(estimate.values())
    return estimate



def memory_table(depths: list[int], micro_tokens: int = 65_536, small_micro_tokens: int = 16_384,
                 ranks: int = 8) -> str:
    rows = []
    for depth in depths:
        with torch.device("meta"):
            model = sc.GPT(sc.GPTConfig(depth=depth))
        one, many = memory_estimate(model, micro_tokens, 1), memory_estimate(model, micro_tokens, ranks)
        state = sum(one[key] for key in ("weights", "gradients", "adam_state", "muon_momentum", "muon_step"))
        passes = one["activations"] + one["weight_copies"] + one["logits"]
        rows.append([depth, f"{model.num_params()['total'] / 1e6:,.0f} M", f"{state / GIB:.1f}",
                     f"{passes / GIB:.1f}", f"{one['total'] / GIB:.0f}", f"{many['total'] / GIB:.0f}",
                     f"{memory_estimate(model, small_micro_tokens, 1)['total'] / GIB:.0f}"])
    header = ["depth", "parameters", "weights, gradients, optimizer (GiB)",
              f"activations at {micro_tokens:,} tokens (GiB)", "total, 1 GPU (GiB)",
              f"total, {ranks} GPUs (GiB per GPU)", f"total at {small_micro_tokens:,} tokens, 1 GPU (GiB)"]
    return "\n".join(markdown_table(header, rows))


if __name__ == "__main__":
    cfg = configure(MemoryConfig)
    try:
        depths = [int(depth) for depth in cfg.depths.split(",")]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        raise sc.ConfigError(f"--depths={cfg.depths!r}: give positive whole numbers separated by commas, e.g. 12,20")
    print(memory_table(depths, cfg.micro_tokens, cfg.small_micro_tokens, cfg.ranks))
