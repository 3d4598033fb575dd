"""What the benchmark scripts in baselines/ share: a stand-in tokenizer, a device sync for timing, and the report
they end with (one aligned table on stdout and the figures as JSON)."""
import itertools
import json

import torch

import stackcore as sc


def synchronize(device: str) -> None:
    """Wait for the device's queued work, so that a wall-clock timer measures it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def filler_tokenizer(vocab_size: int) -> sc.Tokenizer:
    """A tokenizer of exactly vocab_size ids (the 256 bytes, then byte pairs, then the special tokens), so that every
    id a random model samples decodes."""
    merges = vocab_size - len(sc.SPECIAL_TOKENS)
    if not 256 <= merges <= 256 * 257:
        specials = len(sc.SPECIAL_TOKENS)
        raise ValueError(f"vocab_size must be in [{256 + specials}, {256 * 257 + specials}]")
    ranks = {bytes([i]): i for i in range(256)}
    pairs = (bytes(pair) for pair in itertools.product(range(256), repeat=2))
    ranks.update((pair, rank) for rank, pair in zip(range(256, merges), pairs))
    return sc.Tokenizer(ranks)


def report(rows: list[tuple[str, str]], results: dict, out: str) -> None:
    """Print (label, value) rows as a two-column table, then write `results` to `out` (skipped when empty)."""
    width = max(len(label) for label, _ in rows)
    print("\n".join(f"{label:<{width}}  {value}" for label, value in rows))
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"written {out}")
