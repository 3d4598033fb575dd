"""SFT throughput: whole conversations packed into varlen batches (05_sft's loader) against the same conversations
padded to the longest in their batch, on the same model, data and number of steps.

Each step takes the next conversations that fit --batch_tokens when packed. The packed path runs them as one
varlen forward/backward. The padded path runs the same conversations as rows padded to the longest row, in as many
micro-batches as needed to keep rows x longest <= --batch_tokens (so both paths bound memory alike), accumulating
gradients. A padded row is one document in cu_seqlens, its pads after the real tokens (which causal attention keeps
from seeing them) with targets -1, so the loss is the same. Both paths start from the same weights and step the
optimizers of 03_pretrain; their first-step losses must agree. Useful tokens are real conversation tokens: useful
tokens/s is what a run gets done per second.

Conversations are synthetic (lengths drawn like the SFT mixture: many short multiple-choice answers, GSM8K-sized
solutions, long SmolTalk chats; about 40% of tokens trained) or real, from 02_sharding's shards (--shards). The
model is randomly initialised (speed does not depend on the weights; the head too, so that the first-step loss
depends on the data) and used as 05_sft uses it: fp32 master weights, matmuls in the compute dtype, eager unless
--compile. Prints one table and writes JSON to --out.

    python baselines/bench_sft.py                         # GPU: depth 12, 65,536 tokens per step, 20 steps
    python baselines/bench_sft.py --shards ~/.cache/decoderstack/shards/sft
    python baselines/bench_sft.py --depth=1 --model_dim=64 --head_dim=16 --vocab_size=512 --seq_len=1024 \\
        --batch_tokens=4096 --steps=2 --warmup=1 --conversations=200   # CPU smoke test
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch

import stackcore as sc
from baselines.benchlib import synchronize

Conversation = tuple[np.ndarray, np.ndarray]  # token ids (BOS first) and loss mask


def synthetic_conversations(count: int, seq_len: int, vocab_size: int, seed: int) -> list[Conversation]:
    """Lengths: 40% short (multiple choice, 60-250 tokens), 30% medium (GSM8K, 120-450), 30% long (chat, log-normal
    around 700); each cut to seq_len + 1. The last ~40% of each conversation is trained on."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(3, size=count, p=[0.4, 0.3, 0.3])
    lengths = np.where(kind == 0, rng.integers(60, 250, count),
                       np.where(kind == 1, rng.integers(120, 450, count), rng.lognormal(np.log(700), 0.6, count)))
    conversations = []
    for length in np.clip(lengths.astype(int), 8, seq_len + 1):
        ids = rng.integers(1, vocab_size, length)
        ids[0] = 0  # BOS stand-in: the model does not care which id it is
        mask = (np.arange(length) >= int(length * 0.6)).astype(np.uint8)
        conversations.append((ids, mask))
    return conversations


def shard_conversations(shard_dir: str, seq_len: int, count: int, seed: int) -> tuple[list[Conversation], int]:
    """`count` conversations from 02_sharding's train shards (and the tokenizer's vocabulary size)."""
    tokenizer = sc.Tokenizer.load(sc.artifact_dir("tokenizer"))
    loader = sc.SFTLoader(os.path.expanduser(shard_dir), "train", seq_len, tokenizer.bos_id, tokenizer.vocab_size,
                          seq_len, seed=seed)
    chosen = loader.order(0)[:count]
    spans = loader.spans[chosen]
    return ([(np.asarray(loader.shards[s][a:b], dtype=np.int64), np.asarray(loader.masks[s][a:b]))
             for s, a, b in spans], tokenizer.vocab_size)


def step_groups(conversations: list[Conversation], batch_tokens: int, steps: int) -> list[list[Conversation]]:
    """The conversations of each step: the next ones that fit batch_tokens packed (cycling through the data)."""
    groups, cursor = [], 0
    for _ in range(steps):
        group, used = [], 0
        while not group or used + len(conversations[cursor % len(conversations)][0]) - 1 <= batch_tokens:
            ids, mask = conversations[cursor % len(conversations)]
            group.append((ids, mask))
            used += len(ids) - 1
            cursor += 1
        groups.append(group)
    return groups


def make_batch(rows: list[Conversation], pad_to: int | None, device: str) -> sc.Batch:
    """One varlen batch of the rows; with pad_to, each row is padded to that many inputs (pads: id 0, target -1)."""
    inputs, targets, lengths = [], [], []
    for ids, mask in rows:
        row_inputs, row_targets = ids[:-1], np.where(mask[1:] == 1, ids[1:], -1)
        pad = (pad_to or len(row_inputs)) - len(row_inputs)
        inputs.append(np.concatenate([row_inputs, np.zeros(pad, dtype=np.int64)]))
        targets.append(np.concatenate([row_targets, np.full(pad, -1, dtype=np.int64)]))
        lengths.append(len(inputs[-1]))
    cu_seqlens = np.cumsum([0, *lengths]).astype(np.int32)
    return sc.Batch(torch.from_numpy(np.concatenate(inputs)).to(device),
                    torch.from_numpy(np.concatenate(targets)).to(device),
                    torch.from_numpy(cu_seqlens).to(device), int(max(lengths)))


def packed_batches(group: list[Conversation], batch_tokens: int, device: str) -> list[sc.Batch]:
    return [make_batch(group, None, device)]


def padded_batches(group: list[Conversation], batch_tokens: int, device: str) -> list[sc.Batch]:
    """Rows padded to the longest of their micro-batch, rows x longest <= batch_tokens (at least one row)."""
    batches, rows = [], []
    for conversation in group:
        longest = max([len(ids) - 1 for ids, _ in rows + [conversation]])
        if rows and (len(rows) + 1) * longest > batch_tokens:
            batches.append(make_batch(rows, max(len(ids) - 1 for ids, _ in rows), device))
            rows = []
        rows.append(conversation)
    batches.append(make_batch(rows, max(len(ids) - 1 for ids, _ in rows), device))
    return batches


def run_path(name: str, model: sc.GPT, initial_state: dict, groups: list[list[Conversation]], make, args,
             device: str, backend: str) -> dict:
    """Train `len(groups)` steps, the first args.warmup untimed; return the path's figures."""
    model.load_state_dict(initial_state)
    forward = torch.compile(model, dynamic=True) if args.compile else model
    optimizers = sc.build_optimizers(model)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses, useful, computed, micro = [], [], 0, 0, 0
    for step, group in enumerate(groups):
        batches = make(group, args.batch_tokens, device)  # data preparation is not timed
        synchronize(device)
        t0 = time.perf_counter()
        trained = sum((b.targets >= 0).sum() for b in batches)
        loss_sum = 0.0
        for batch in batches:
            loss = forward(batch.inputs, batch.cu_seqlens, batch.max_seqlen, batch.targets, backend=backend,
                           loss_reduction="sum") / trained
            loss.backward()
            loss_sum += loss.detach()
        sc.step_optimizers(optimizers)
        losses.append(float(loss_sum))
        seconds = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(seconds)
            useful += sum(len(ids) - 1 for ids, _ in group)
            computed += sum(len(b.inputs) for b in batches)
            micro += len(batches)
    total = sum(times)
    return {"path": name, "timed_steps": len(times), "useful_tokens": useful, "computed_tokens": computed,
            "micro_batches_per_step": micro / max(len(times), 1), "padding_fraction": 1 - useful / computed,
            "useful_tokens_per_second": useful / total, "computed_tokens_per_second": computed / total,
            "median_step_ms": 1000 * statistics.median(times), "first_loss": losses[0], "last_loss": losses[-1],
            "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--model_dim", type=int, default=0, help="0: 64 x depth")
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=32768, help="synthetic data only (shards: the tokenizer's)")
    parser.add_argument("--seq_len", type=int, default=2048, help="longest conversation (longer ones are cut)")
    parser.add_argument("--batch_tokens", type=int, default=65_536, help="tokens per packed step (05_sft's micro_tokens)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--conversations", type=int, default=20_000, help="synthetic conversations to draw")
    parser.add_argument("--shards", default="", help="02_sharding's shards/sft folder: real conversations instead")
    parser.add_argument("--attention", default="auto", help="auto | flash | varlen | flex | sdpa")
    parser.add_argument("--compile", action="store_true", help="torch.compile(dynamic=True), as 05_sft on a GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_sft.json")
    args = parser.parse_args()

    device = sc.pick_device()
    backend = sc.pick_attention_backend(device, args.attention)
    if args.shards:
        conversations, vocab_size = shard_conversations(args.shards, args.seq_len, args.conversations, args.seed)
    else:
        conversations = synthetic_conversations(args.conversations, args.seq_len, args.vocab_size, args.seed)
        vocab_size = args.vocab_size
    groups = step_groups(conversations, args.batch_tokens, args.warmup + args.steps)
    torch.manual_seed(args.seed)
    model = sc.GPT(sc.GPTConfig(vocab_size=vocab_size, depth=args.depth, model_dim=args.model_dim,
                                head_dim=args.head_dim, max_seq_len=args.seq_len)).to(device)
    model.set_compute_dtype(sc.pick_compute_dtype(device))
    torch.nn.init.normal_(model.lm_head.weight, std=0.02)  # the zero init would make every first loss ln(vocab)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = [run_path(name, model, initial_state, groups, make, args, device, backend)
               for name, make in (("packed", packed_batches), ("padded", padded_batches))]

    print(f"device {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'} | torch {torch.__version__} | "
          f"attention {backend} | depth {args.depth} | {model.num_params()['total'] / 1e6:.1f} M parameters | "
          f"{'real' if args.shards else 'synthetic'} conversations | compile {args.compile}")
    print(f"{'path':<8} {'useful tok/s':>13} {'computed tok/s':>15} {'padding':>8} {'micro/step':>10} "
          f"{'step ms':>8} {'peak GB':>8} {'first loss':>11}")
    for r in results:
        peak = f"{r['peak_memory_GB']:.1f}" if r["peak_memory_GB"] is not None else "-"
        print(f"{r['path']:<8} {r['useful_tokens_per_second']:>13,.0f} {r['computed_tokens_per_second']:>15,.0f} "
              f"{r['padding_fraction']:>8.1%} {r['micro_batches_per_step']:>10.1f} {r['median_step_ms']:>8.1f} "
              f"{peak:>8} {r['first_loss']:>11.5f}")
    packed, padded = results
    speedup = packed["useful_tokens_per_second"] / padded["useful_tokens_per_second"]
    loss_gap = abs(packed["first_loss"] - padded["first_loss"])
    print(f"packed / padded useful tokens per second: {speedup:.2f}x | first-step loss gap {loss_gap:.2e}")
    report = {"args": vars(args), "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "attention": backend, "parameters": model.num_params()["total"],
              "conversations_per_step": statistics.mean(len(g) for g in groups), "results": results,
              "speedup_useful_tokens_per_second": speedup, "first_loss_gap": loss_gap}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
