"""Where a packed CORE pass spends its time: torch.profiler over the passes of one task's first examples.

    python3 baselines/profile_core.py --depth=20 --task=bigbench_language_identification --examples=200 --compile=1
    python3 baselines/profile_core.py --examples=1000 --timed=3 --rows=0 --inductor=max_autotune_gemm=True

The model is randomly initialised (the cost of a pass does not depend on the weights) and the task's eval shard
comes from STACK_HOME (02_sharding). Prints the wall time and tokens/s of the scoring, then the profiler's table of
the most expensive ops by device time (with their host time: building packs and block masks shows there).
`--timed=N` first times N passes without the profiler (the best is the figure to compare); `--inductor` sets an
inductor option of the compiled evaluation graph (GPT.compile_layers' inductor_options) to compare settings.
"""
import argparse
import ast
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

import stackcore as sc
from baselines.benchlib import synchronize
from notebooks.core_eval import core_input_tokens, first_examples


def timed_seconds(score, device: str) -> float:
    """Wall time of one scoring, with the GPU's queue drained before and after."""
    synchronize(device)
    started = time.perf_counter()
    score()
    synchronize(device)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--task", default="bigbench_language_identification")
    parser.add_argument("--examples", type=int, default=200, help="first examples of the task to score")
    parser.add_argument("--pack_tokens", type=int, default=32_768)
    parser.add_argument("--rows", type=int, default=18, help="rows of the op table")
    parser.add_argument("--attention", default="auto", help="attention backend (pick_attention_backend)")
    parser.add_argument("--compile", type=int, default=1, help="1: layers compiled on a GPU (04's --compile=true)")
    parser.add_argument("--timed", type=int, default=0, help="passes timed without the profiler first")
    parser.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                        help="inductor option of the evaluation graph, VALUE a Python literal (repeatable)")
    parser.add_argument("--trace", default="", help="also write the profile, with shapes and Python stacks, as a "
                                                    "Chrome trace to this file")
    args = parser.parse_args()

    inductor_options = {}
    for option in args.inductor:
        key, _, value = option.partition("=")
        if not hasattr(inductor_config, key):
            parser.error(f"--inductor={option}: torch {torch.__version__} has no inductor setting {key!r}")
        try:
            inductor_options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parser.error(f"--inductor={option}: the value must be a Python literal (True, 8, 'max-autotune')")
    device = sc.pick_device()
    backend = sc.pick_attention_backend(device, args.attention)
    shards = {s.label: s for s in sc.read_core_shards(sc.artifact_dir("shards") / "core")}
    if args.task not in shards:
        parser.error(f"no CORE task {args.task!r} in STACK_HOME's eval shards; there are: {', '.join(shards)}")
    shard = first_examples(shards[args.task], args.examples)
    model = sc.GPT(sc.GPTConfig(vocab_size=int(shard.tokens.max()) + 1 if device == "cpu" else 32768,
                                depth=args.depth)).to(device)
    model.set_compute_dtype(sc.pick_compute_dtype(device))
    model.cast_weights_for_inference().eval()
    if args.compile and device.startswith("cuda"):
        model.compile_layers(evaluation=True, inductor_options=inductor_options)
    score = lambda: sc.score_core_records(model, shard.tokens, shard.records, backend, device, args.pack_tokens)
    score()  # compiles the layers, flex and its mask builder
    tokens = core_input_tokens(shard, model.config.max_seq_len, args.pack_tokens)
    label = f"{args.task}, first {args.examples} examples, depth {args.depth}, {device}, {backend}"
    timed = [timed_seconds(score, device) for _ in range(args.timed)]
    if timed:
        print(f"{label}, inductor options {inductor_options}: timed passes "
              f"{', '.join(f'{t:.3f}' for t in timed)} s; best "
              f"{min(timed):.3f} s, {tokens / min(timed):,.0f} tokens/s")
    if not args.rows:
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities, record_shapes=bool(args.trace), with_stack=bool(args.trace)) as prof:
        started = time.perf_counter()
        score()
        seconds = time.perf_counter() - started
    print(f"{label}: {seconds:.2f} s under the profiler for {tokens:,} tokens fed ({tokens / seconds:,.0f} tokens/s, "
          f"{args.examples / seconds:,.0f} examples/s)")
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
