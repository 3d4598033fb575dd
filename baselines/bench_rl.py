"""Speed of one step of 06_rl: rollouts (Engine.generate with the calculator, the prompts prefilled together in
packed passes) and the update (the packed policy-gradient forward/backward and the optimizer step).

The model is randomly initialised and the prompts are random tokens ending in <|assistant_start|>: speed does not
depend on the weights, and a random model never stops early, so every answer runs to --max_new_tokens (the slowest
case). The tokenizer is a filler vocabulary of all byte pairs, so that any sampled id decodes. Rewards are seeded
coin flips, so that nearly every group has mixed rewards and nearly every rollout is trained, as in the costliest
step of a real run. The model is used as 06_rl uses it: fp32 master weights, matmuls in the compute dtype, not
compiled (--compile=inductor compiles the rollout engine's decode step). Prints one table and writes
the figures as JSON to --out.

    python baselines/bench_rl.py                     # GPU: depth 12, 32 prompts x 8 samples (256 rollouts)
    python baselines/bench_rl.py --sync_every=1 --cuda_graph=0   # the per-token engine, not captured
    python baselines/bench_rl.py --depth=2 --vocab_size=1024 --prompts=2 --samples=2 --prompt_len=16 \\
        --max_new_tokens=8 --repeats=1                # CPU smoke test
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import stackcore as sc
from baselines.benchlib import filler_tokenizer, report, synchronize
from data.gsm8k import TaskPrompt
from notebooks import rl


def random_prompts(tokenizer: sc.Tokenizer, count: int, length: int, seed: int) -> list[TaskPrompt]:
    """<|bos|> <|user_start|> random tokens <|user_end|> <|assistant_start|>, `length` tokens in all."""
    rng = random.Random(seed)
    special = tokenizer.special_id
    ordinary = tokenizer.vocab_size - len(sc.SPECIAL_TOKENS)

    def prompt() -> list[int]:
        body = [rng.randrange(ordinary) for _ in range(length - 4)]
        return [tokenizer.bos_id, special("<|user_start|>"), *body, special("<|user_end|>"),
                special("<|assistant_start|>")]

    return [TaskPrompt(prompt(), "0", i) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--prompts", type=int, default=32, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="samples per prompt")
    parser.add_argument("--prompt_len", type=int, default=160, help="tokens per prompt (GSM8K: about 100-250)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--pass_tokens", type=int, default=65_536, help="tokens per forward/backward pass")
    parser.add_argument("--attention", default="auto", help="auto | flash | varlen | flex | sdpa")
    parser.add_argument("--compile", default="none", help="the engine's decode-step compile backend: none | "
                                                              "inductor")
    parser.add_argument("--sync_every", type=int, default=16, help="engine decode steps between host syncs")
    parser.add_argument("--cuda_graph", type=int, default=1, help="replay the engine's decode step as a CUDA graph")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step (median kept)")
    parser.add_argument("--out", default="bench_rl.json")
    args = parser.parse_args()

    device = sc.pick_device()
    dtype = sc.pick_compute_dtype(device)
    backend = sc.pick_attention_backend(device, args.attention)
    torch.manual_seed(0)
    tokenizer = filler_tokenizer(args.vocab_size)
    config = sc.GPTConfig(vocab_size=args.vocab_size, depth=args.depth,
                          max_seq_len=max(2048, args.prompt_len + args.max_new_tokens))
    model = sc.GPT(config).to(device)
    model.set_compute_dtype(dtype)
    engine = sc.Engine(model, tokenizer, backend, cuda_graph=bool(args.cuda_graph), sync_every=args.sync_every,
                       compile_backend=None if args.compile == "none" else args.compile)
    optimizers = sc.build_optimizers(model, lr_scale=0.05)  # 06_rl's learning rates: 5% of pretraining's
    prompts = random_prompts(tokenizer, args.prompts, args.prompt_len, seed=1)
    coin = random.Random(2)

    def coin_flip(text: str, gold: str) -> float:
        return float(coin.random() < 0.5)

    def step(seed: int) -> dict[str, float]:
        synchronize(device)
        t0 = time.perf_counter()
        groups = rl.generate_rollouts(engine, prompts, coin_flip, args.samples, args.max_new_tokens, seed=seed)
        synchronize(device)
        t1 = time.perf_counter()
        stats = rl.policy_gradient_backward(model, groups, backend, args.pass_tokens, device)
        sc.step_optimizers(optimizers)
        synchronize(device)
        t2 = time.perf_counter()
        answer_tokens = sum(len(seq) - len(g.prompt.ids) for g in groups for seq in g.sequences)
        return {"rollout_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0, "answer_tokens": answer_tokens,
                "trained_sequences": stats["trained_sequences"], "passes": stats["passes"],
                "rollout_tokens_per_s": answer_tokens / (t1 - t0),
                "update_tokens_per_s": stats["trained_tokens"] / (t2 - t1)}

    step(seed=0)  # warm-up: allocator, kernels, attention-backend checks
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    runs = [step(seed=1000 * (r + 1)) for r in range(args.repeats)]
    median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    results = {"device": name, "dtype": str(dtype), "attention": backend, "depth": args.depth,
               "params": model.num_params()["total"], "prompts": args.prompts, "samples": args.samples,
               "prompt_len": args.prompt_len, "compile": args.compile, "sync_every": args.sync_every,
               "cuda_graph": bool(args.cuda_graph), "max_new_tokens": args.max_new_tokens,
               "pass_tokens": args.pass_tokens,
               "repeats": args.repeats, "median": median, "runs": runs,
               "peak_memory_GB": torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else None}
    rows = [("device", name),
            ("model", f"depth {args.depth}, {results['params'] / 1e6:.1f} M params, {dtype}, {backend}"),
            ("step", f"{args.prompts} prompts x {args.samples} samples, prompt {args.prompt_len}, "
                     f"up to {args.max_new_tokens} new tokens"),
            ("rollouts", f"{median['rollout_s']:.2f} s, {median['rollout_tokens_per_s']:,.0f} answer tokens/s "
                         f"({median['answer_tokens']:,.0f} tokens)"),
            ("update (fwd + bwd + optimizer)", f"{median['update_s']:.2f} s, {median['update_tokens_per_s']:,.0f} "
                                               f"tokens/s, {median['trained_sequences']:.0f} sequences in "
                                               f"{median['passes']:.0f} pass(es)"),
            ("RL step", f"{median['step_s']:.2f} s ({median['rollout_s'] / median['step_s']:.0%} in rollouts)")]
    if results["peak_memory_GB"] is not None:
        rows.append(("peak memory", f"{results['peak_memory_GB']:.1f} GB"))
    report(rows, results, args.out)


if __name__ == "__main__":
    main()
