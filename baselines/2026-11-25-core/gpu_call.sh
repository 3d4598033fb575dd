#!/usr/bin/env bash
# One device call on two H100s of one host (nvidia-h100-x2), both busy at once: full CORE passes (notebook 04, the
# 18 tasks of ../shared/data/core, plus the first 10 examples of every task one prompt at a time) of a 2-step
# depth-12 checkpoint on GPU 0 and of a 1-step depth-20 checkpoint on GPU 1 (speed, not score: a trained depth-12
# model's score is in ../2026-11-25-d20).
# Artifacts as in ../2026-11-25-pipeline/gpu_call.sh (.gpu/home.tar.xz, built on a CPU by notebooks 01 and 02).
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core/gpu_call.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
unpack_home /tmp/stack20  # the depth-20 pass's own STACK_HOME

core_pass() {  # GPU depth steps STACK_HOME (one each: both runs write runs/04_core_eval)
  export CUDA_VISIBLE_DEVICES=$1 STACK_HOME=$4
  part 03_d$2 140 150 python3 baselines/bench_pretrain.py --depth=$2 --steps=$3 --eval_every=$3 --timeout=135 \
    --out="$OUT/vs" --data="$D/english"
  part 04_core_d$2 150 3 python3 notebooks/04_core_eval.py --preset=speedrun --run_name=ours_d$2 --compare_examples=10
  cp "$STACK_HOME/runs/04_core_eval/results.json" "$OUT/core_d$2.json" 2>/dev/null
}
ours() { core_pass 0 12 2 /tmp/stack; }
peer() { core_pass 1 20 1 /tmp/stack20; }
ours & peer & wait
pack_results
cat "$OUT/summary.txt"
grep -h -E "CORE |packed|one_by_one|first 10|in [0-9.]+ s$" "$OUT"/04*.log | tail -60
