"""Decode speed of the KV-cache engine against the bound that memory bandwidth sets.

A decode step must read every weight matrix once and the keys and values each query attends to, so
    tokens/s <= batch x bandwidth / (weight bytes + KV-cache bytes read per step).
For each depth, this script builds a randomly initialised model (speed does not depend on the weights), measures
the device's copy bandwidth, prefills one prompt of --prompt_len tokens into every row (PackedPrompts), then times
at each batch size: the engine's decode step (sc.DecodeStep: sampling with top-k on the device, chunks of
--sync_every steps read back once, on a GPU replayed as one CUDA graph, compiled with --compile=inductor), and
`Engine.generate` end to end (prefill, chunk bookkeeping and the graph capture included). It first checks that the
captured engine gives the greedy tokens of the eager one. Prints one table and writes the figures as JSON to --out.
RL's rollout step is baselines/bench_rl.py.

    python baselines/bench_decode.py                     # GPU: depths 12 and 20, batches 1, 16, 64, 256
    python baselines/bench_decode.py --depths=2 --vocab_size=1024 --prompt_len=64 --decode=16 --batches=1,4  # CPU
"""
import argparse
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import stackcore as sc
from baselines.benchlib import filler_tokenizer, report, synchronize
from notebooks.config import layer_list


def timed(fn, device: str, repeats: int = 3) -> float:
    """Median wall time of fn() in seconds, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Bytes per second moved by a large device-to-device copy (each byte read once and written once)."""
    nbytes = (1 << 30) if device.startswith("cuda") else (64 << 20)
    source = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * nbytes / timed(lambda: target.copy_(source), device, repeats=5)


def bytes_per_decode_step(model: sc.GPT, batch: int, context: float, dtype: torch.dtype) -> float:
    """Weights (all but the embedding tables, of which a step reads one row per row of the batch) plus the keys
    and values every layer's query reads at a mean context of `context` tokens."""
    element = torch.empty((), dtype=dtype).element_size()
    tables = [model.wte, *model.value_embeds]
    table_params = {id(table.weight) for table in tables}
    weights = sum(p.numel() for p in model.parameters() if id(p) not in table_params) * element
    rows = batch * len(tables) * model.config.dim * element
    keys = sum(min(window or context, context) for window in model.layer_windows())
    return weights + rows + batch * keys * 2 * model.config.dim * element


def random_model(depth: int, vocab_size: int, max_seq_len: int, device: str, dtype: torch.dtype,
                 **switches: Any) -> sc.GPT:
    """Random weights; `switches` are GPTConfig's architecture switches (key_offset, paired_head_layers, ...)."""
    torch.manual_seed(0)
    model = sc.GPT(sc.GPTConfig(vocab_size=vocab_size, depth=depth, max_seq_len=max_seq_len, **switches)).to(device)
    for parameter in model.parameters():  # the zero-initialised projections get small values: non-trivial logits
        if parameter.ndim == 2 and not parameter.any():
            torch.nn.init.normal_(parameter, std=0.02)
    model.set_compute_dtype(dtype)
    model.to(dtype)  # inference keeps no fp32 master weights: a step reads each weight once, in the compute dtype
    return model.eval()


def step_runner(engine: sc.Engine, batch: int, prompt: torch.Tensor, steps: int):
    """A function running `steps` engine decode steps (top-k 50 sampling) of `batch` rows continuing the prompt,
    in chunks of engine.sync_every read back to the host; the prompt is prefilled once, each run rewinds the rows."""
    model = engine.model
    cache = sc.KVCache(model.config, batch, len(prompt) + steps, prompt.device, model.compute_dtype)
    packed = sc.PackedPrompts(cache, [len(prompt)], [0], copies=batch)
    logits = model(prompt, kv_cache=packed, backend=engine.backend, logit_rows=packed.last_tokens())
    chunk = engine.sync_every
    step = sc.DecodeStep(model, cache, engine.backend, sc.Sampling(top_k=50), stop_ids=[-1], python_end=-1,
                         chunk=chunk, cuda_graph=engine.cuda_graph, compile_backend=engine.compile_backend)
    uniforms = torch.rand(batch, chunk)
    no_forcing = (torch.zeros(batch, chunk, dtype=torch.long), torch.zeros(batch, dtype=torch.long))

    def run() -> None:
        cache.lengths.fill_(len(prompt))
        step.start(logits.expand(batch, -1), [steps] * batch)
        for _ in range(steps // chunk):
            step.begin_chunk(uniforms, *no_forcing)
            for _ in range(chunk):
                step()
            step.read_chunk()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="12,20", help="model depths, comma-separated")
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--prompt_len", type=int, default=1024)
    parser.add_argument("--decode", type=int, default=256, help="decode steps per measurement (a multiple of "
                                                                 "--sync_every)")
    parser.add_argument("--batches", default="1,16,64,256", help="decode batch sizes, comma-separated")
    parser.add_argument("--sync_every", type=int, default=16, help="steps between host syncs")
    parser.add_argument("--attention", default="auto", help="prefill backend: auto | flash | varlen | flex | sdpa")
    parser.add_argument("--compile", default="none", help="the step's torch.compile backend: none | inductor")
    parser.add_argument("--key_offset", type=int, default=0, help="1: modded-nanogpt's key offset (sc.GPTConfig)")
    parser.add_argument("--paired_heads", default="", help="paired-head layers, comma-separated, e.g. 0,2,5,9")
    parser.add_argument("--smear", type=int, default=0, help="1: modded-nanogpt's smear (sc.GPTConfig)")
    parser.add_argument("--backout", type=int, default=0, help="1: modded-nanogpt's backout (sc.GPTConfig)")
    parser.add_argument("--out", default="bench_decode.json")
    args = parser.parse_args()
    if args.decode % args.sync_every:
        parser.error(f"--decode {args.decode} must be a multiple of --sync_every {args.sync_every}")

    device = sc.pick_device()
    dtype = sc.pick_compute_dtype(device)
    backend = sc.pick_attention_backend(device, args.attention)
    compile_backend = None if args.compile == "none" else args.compile
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    bandwidth = copy_bandwidth(device)
    tokenizer = filler_tokenizer(args.vocab_size)
    results = {"device": name, "dtype": str(dtype), "attention": backend, "compile": args.compile,
               "decode_attention": "flash_attn_with_kvcache" if sc._flash_kvcache_function() and device != "cpu"
               else "sdpa", "prompt_len": args.prompt_len, "decode_steps": args.decode, "sync_every": args.sync_every,
               "copy_bandwidth_GBps": bandwidth / 1e9, "key_offset": bool(args.key_offset),
               "paired_heads": args.paired_heads, "smear": bool(args.smear), "backout": bool(args.backout),
               "depths": {}}
    rows = []

    def add(row: tuple[str, str]) -> None:  # printed at once too: a run cut short keeps what it measured
        rows.append(row)
        print(*row, sep=": ", flush=True)

    add(("device", f"{name}, copy bandwidth {bandwidth / 1e9:,.0f} GB/s, decode attention "
                   f"{results['decode_attention']}"))
    for depth in (int(d) for d in args.depths.split(",")):
        model = random_model(depth, args.vocab_size, max(2048, args.prompt_len + args.decode), device, dtype,
                             key_offset=bool(args.key_offset), smear=bool(args.smear), backout=bool(args.backout),
                             paired_head_layers=layer_list("--paired_heads", args.paired_heads))
        engine = sc.Engine(model, tokenizer, backend, compile_backend=compile_backend, sync_every=args.sync_every)
        entry = results["depths"][str(depth)] = {"params": model.num_params()["total"], "batches": {}}
        add((f"depth {depth}", f"{entry['params'] / 1e6:.1f} M params, {dtype}"))
        prompt = torch.randint(0, args.vocab_size - len(sc.SPECIAL_TOKENS), (args.prompt_len,), device=device)
        eager = sc.Engine(model, tokenizer, backend, cuda_graph=False, compile_backend=None, sync_every=1)
        prompts = [prompt[:len(prompt) // 3].tolist(), prompt.tolist()]
        same = [e.generate_batch(prompts, 2, 32, temperature=0.0)[0] for e in (engine, eager)]
        entry["greedy_tokens_equal_eager"] = same[0] == same[1]
        add((f"depth {depth}: greedy tokens, engine vs eager", "identical" if same[0] == same[1] else
             f"differ in {sum(a != b for a, b in zip(*same))} of {len(same[0])} rows"))
        context = args.prompt_len + (args.decode - 1) / 2  # mean number of cached positions over the steps
        for batch in (int(b) for b in args.batches.split(",")):
            bound = batch * bandwidth / bytes_per_decode_step(model, batch, context, dtype)
            with torch.inference_mode():
                step_rate = batch * args.decode / timed(step_runner(engine, batch, prompt, args.decode), device)
            generated = []
            seconds = timed(lambda: generated.append(engine.generate(prompt.tolist(), batch, args.decode, top_k=50)),
                            device)
            engine_rate = sum(map(len, generated[-1][0])) / seconds  # prefill included: the end-to-end figure
            entry["batches"][str(batch)] = {"bound_tokens_per_s": bound, "step_tokens_per_s": step_rate,
                                            "engine_tokens_per_s": engine_rate}
            add((f"depth {depth}, batch {batch}", f"bound {bound:,.0f} tokens/s; step {step_rate:,.0f} "
                                                  f"({step_rate / bound:.1%}); Engine.generate {engine_rate:,.0f} "
                                                  f"({engine_rate / step_rate:.0%} of the step rate)"))
        del model, engine, eager
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    report(rows, results, args.out)


if __name__ == "__main__":
    main()
