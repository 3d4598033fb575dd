"""What training needs in memory per GPU at each depth: an estimate from GPT.memory_estimate, printed as the
Markdown table of tutorials/02_headless_and_torchrun.md.

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
from notebooks.report import markdown_table

GIB = 2**30


@dataclass
class MemoryConfig(sc.StackConfig):
    depths: str = "12,20,26"  # comma-separated model depths (the default vocabulary and context of GPTConfig)
    micro_tokens: int = 65_536  # tokens per forward/backward pass on one GPU (the speedrun and node presets')
    small_micro_tokens: int = 16_384  # the last column: a smaller pass, with more accumulation steps per step
    ranks: int = 8  # GPUs sharing Muon's momentum in the multi-GPU column
    LIMITS = {"micro_tokens": sc.above(0), "small_micro_tokens": sc.above(0), "ranks": sc.above(0)}


def memory_table(depths: list[int], micro_tokens: int = 65_536, small_micro_tokens: int = 16_384,
                 ranks: int = 8) -> str:
    rows = []
    for depth in depths:
        with torch.device("meta"):
            model = sc.GPT(sc.GPTConfig(depth=depth))
        one, many = model.memory_estimate(micro_tokens, 1), model.memory_estimate(micro_tokens, ranks)
        state = sum(one[key] for key in ("weights", "gradients", "adam_state", "muon_momentum", "muon_step"))
        passes = one["activations"] + one["weight_copies"] + one["logits"]
        rows.append([depth, f"{model.num_params()['total'] / 1e6:,.0f} M", f"{state / GIB:.1f}",
                     f"{passes / GIB:.1f}", f"{one['total'] / GIB:.0f}", f"{many['total'] / GIB:.0f}",
                     f"{model.memory_estimate(small_micro_tokens, 1)['total'] / GIB:.0f}"])
    header = ["depth", "parameters", "weights, gradients, optimizer (GiB)",
              f"activations at {micro_tokens:,} tokens (GiB)", "total, 1 GPU (GiB)",
              f"total, {ranks} GPUs (GiB per GPU)", f"total at {small_micro_tokens:,} tokens, 1 GPU (GiB)"]
    return "\n".join(markdown_table(header, rows))


if __name__ == "__main__":
    cfg = sc.configure(MemoryConfig)
    try:
        depths = [int(depth) for depth in cfg.depths.split(",")]
    except ValueError:
        depths = []
    if not depths or min(depths) < 1:
        raise sc.ConfigError(f"--depths={cfg.depths!r}: give positive whole numbers separated by commas, e.g. 12,20")
    print(memory_table(depths, cfg.micro_tokens, cfg.small_micro_tokens, cfg.ranks))
