"""Inference speed of the KV-cache engine against the bound that memory bandwidth sets.

A decode step must read every weight matrix once and the keys and values each query attends to, so
    tokens/s <= batch x bandwidth / (weight bytes + KV-cache bytes read per step).
This script builds a randomly initialised model (speed does not depend on the weights), measures the device's
copy bandwidth, then times: prefill (one prompt of --prompt_len tokens), eager decode steps (sc.DecodeStep) at
each batch size, the same steps replayed as one CUDA graph (GPU only), and `Engine.generate` end to end (sampling,
tool bookkeeping and, on a GPU, the graph capture included). Prints one table and writes the figures as JSON to --out.

    python baselines/bench_decode.py                     # GPU: depth 12, bf16, prompt 1792, 255 decode steps
    python baselines/bench_decode.py --depth=2 --prompt_len=64 --decode=16   # CPU smoke test
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

import stackcore as sc
from baselines.benchlib import filler_tokenizer, report, synchronize


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


def prefilled_cache(model: sc.GPT, batch: int, prompt: torch.Tensor, steps: int, backend: str) -> sc.KVCache:
    cache = sc.KVCache(model.config, batch, len(prompt) + steps, prompt.device, model.compute_dtype)
    model(prompt[None], kv_cache=cache.rows(0, 1), backend=backend)
    cache.broadcast_first_row()
    return cache


def decoder(model, batch, prompt, steps, backend, cuda_graph: bool):
    """A function running `steps` greedy decode steps (sc.DecodeStep: eager, or one CUDA graph replayed) after the
    prefilled prompt, which is prefilled once: each run rewinds the rows' lengths to the prompt's end."""
    cache = prefilled_cache(model, batch, prompt, steps, backend)
    step = sc.DecodeStep(model, cache, backend, cuda_graph)

    def run(n: int = steps) -> list[torch.Tensor]:
        cache.lengths.fill_(len(prompt))
        ids = torch.zeros(batch, dtype=torch.long, device=prompt.device)
        logits = []
        for _ in range(n):
            logits.append(step(ids))
            ids = logits[-1].argmax(-1)
        return logits

    return run


def graph_difference(model, batch, prompt, steps, backend) -> float:
    """Largest logit difference over 8 greedy steps between the CUDA-graph step and the eager one."""
    eager, graph = (decoder(model, batch, prompt, steps, backend, cuda_graph) for cuda_graph in (False, True))
    return max((a - b).abs().max().item() for a, b in zip(eager(8), graph(8)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--vocab_size", type=int, default=32768)
    parser.add_argument("--prompt_len", type=int, default=1792)
    parser.add_argument("--decode", type=int, default=255, help="decode steps per measurement")
    parser.add_argument("--batches", default="1,16", help="decode batch sizes, comma-separated")
    parser.add_argument("--attention", default="auto", help="prefill backend: auto | flash | varlen | flex | sdpa")
    parser.add_argument("--cuda_graph", type=int, default=1, help="also time CUDA-graph decode steps (GPU only)")
    parser.add_argument("--key_offset", type=int, default=0, help="1: modded-nanogpt's key offset (sc.GPTConfig)")
    parser.add_argument("--paired_heads", default="", help="paired-head layers, comma-separated, e.g. 0,2,5,9")
    parser.add_argument("--out", default="bench_decode.json")
    args = parser.parse_args()

    device = sc.pick_device()
    dtype = sc.pick_compute_dtype(device)
    backend = sc.pick_attention_backend(device, args.attention)
    torch.manual_seed(0)
    config = sc.GPTConfig(vocab_size=args.vocab_size, depth=args.depth,
                          max_seq_len=max(2048, args.prompt_len + args.decode), key_offset=bool(args.key_offset),
                          paired_head_layers=sc.layer_list("--paired_heads", args.paired_heads))
    model = sc.GPT(config).to(device)
    for parameter in model.parameters():  # the zero-initialised projections get small values: non-trivial logits
        if parameter.ndim == 2 and not parameter.any():
            torch.nn.init.normal_(parameter, std=0.02)
    model.set_compute_dtype(dtype)
    model.to(dtype)  # inference keeps no fp32 master weights: a step reads each weight once, in the compute dtype
    model.eval()
    prompt = torch.randint(0, args.vocab_size, (args.prompt_len,), device=device)
    bandwidth = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    results = {"device": name, "dtype": str(dtype), "attention": backend, "depth": args.depth,
               "key_offset": config.key_offset, "paired_head_layers": list(config.paired_head_layers),
               "params": model.num_params()["total"], "prompt_len": args.prompt_len, "decode_steps": args.decode,
               "copy_bandwidth_GBps": bandwidth / 1e9, "decode": {}}
    rows = []

    def add(row: tuple[str, str]) -> None:  # printed at once too: a run cut short keeps what it measured
        rows.append(row)
        print(*row, sep=": ", flush=True)

    for row in (("device", name), ("model", f"depth {args.depth}, {results['params'] / 1e6:.1f} M params, {dtype}"),
                ("copy bandwidth", f"{bandwidth / 1e9:,.0f} GB/s")):
        add(row)

    tokenizer = filler_tokenizer(args.vocab_size)
    if device.startswith("cuda"):  # the engine's graph path against its eager path, on prompts of two lengths
        prompts = [prompt[:len(prompt) // 3].tolist(), prompt.tolist()]
        outputs = [sc.Engine(model, tokenizer, backend, cuda_graph=graph).generate_batch(
            prompts, 4, 64, temperature=0.0)[0] for graph in (True, False)]
        results["engine_graph_equals_eager"] = outputs[0] == outputs[1]
        add(("Engine greedy tokens, CUDA graph vs eager", "identical" if outputs[0] == outputs[1] else
             f"differ in {sum(a != b for a, b in zip(*outputs))} of {len(outputs[0])} rows"))
    with torch.inference_mode():
        seconds = timed(lambda: prefilled_cache(model, 1, prompt, 0, backend), device)
        results["prefill_tokens_per_s"] = args.prompt_len / seconds
        add((f"prefill ({args.prompt_len} tokens, {backend})", f"{args.prompt_len / seconds:,.0f} tokens/s"))
        context = args.prompt_len + (args.decode - 1) / 2  # mean number of cached positions over the steps
        for batch in (int(b) for b in args.batches.split(",")):
            bound = batch * bandwidth / bytes_per_decode_step(model, batch, context, dtype)
            entry = results["decode"][str(batch)] = {"bound_tokens_per_s": bound}
            add((f"batch {batch}: bandwidth bound", f"{bound:,.0f} tokens/s"))
            measures = {"eager": decoder(model, batch, prompt, args.decode, backend, cuda_graph=False)}
            if args.cuda_graph and device.startswith("cuda"):
                try:
                    difference = graph_difference(model, batch, prompt, args.decode, backend)
                    entry["cuda_graph_max_logit_diff"] = difference
                    add((f"batch {batch}: CUDA graph vs eager", f"max logit difference {difference:.3g}"))
                    measures["cuda_graph"] = decoder(model, batch, prompt, args.decode, backend, cuda_graph=True)
                except Exception as error:  # an optional path: report it and go on
                    add((f"batch {batch}: CUDA graph", f"skipped ({type(error).__name__}: {error})"[:120]))
            for label, run in measures.items():
                rate = batch * args.decode / timed(run, device)
                entry[f"{label}_tokens_per_s"] = rate
                add((f"batch {batch}: decode {label}", f"{rate:,.0f} tokens/s ({rate / bound:.1%} of bound)"))
    engine = sc.Engine(model, tokenizer, backend)
    for batch in (int(b) for b in args.batches.split(",")):
        generated = []
        seconds = timed(lambda: generated.append(engine.generate(prompt.tolist(), batch, args.decode, top_k=50)),
                        device)
        tokens = sum(map(len, generated[-1][0]))
        rate = tokens / seconds  # prefill included: the end-to-end figure
        results["decode"][str(batch)]["engine_tokens_per_s"] = rate
        add((f"batch {batch}: Engine.generate (prefill incl.)", f"{rate:,.0f} tokens/s ({tokens} tokens)"))

    report(rows, results, args.out)


if __name__ == "__main__":
    main()
