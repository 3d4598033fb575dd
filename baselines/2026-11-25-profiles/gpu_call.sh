#!/usr/bin/env bash
# One device call on two H100s of one host (nvidia-h100-x2), both busy at once:
#   GPU 0: a 2-step depth-12 checkpoint and notebook 04 on it (full CORE pass, plus the first 10 examples of every
#          task one prompt at a time); profiles of packed CORE scoring (baselines/profile_core.py) at depths 20 and 12.
#   GPU 1: a profile of one depth-12 training step (tutorials/profile_step.py); the decode benchmark at depths 12
#          and 20, which first checks the engine's CUDA-graph decoding against its eager decoding.
# Artifacts as in ../2026-11-25-pipeline/gpu_call.sh (.gpu/home.tar.xz, built on a CPU by notebooks 01 and 02).
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-profiles/gpu_call.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"

ours() {
  export CUDA_VISIBLE_DEVICES=0
  part 03_d12 80 220 python3 baselines/bench_pretrain.py --depth=12 --steps=2 --eval_every=2 --timeout=68 \
    --out="$OUT/vs" --data="$D/english"
  part 04_core_d12 120 100 python3 notebooks/04_core_eval.py --preset=speedrun --run_name=ours_d12 --compare_examples=10
  cp "$STACK_HOME/runs/04_core_eval/results.json" "$OUT/core_d12.json" 2>/dev/null
  part profile_core_d20 60 45 python3 baselines/profile_core.py --depth=20
  part profile_core_d12 45 3 python3 baselines/profile_core.py --depth=12
}
peer() {
  export CUDA_VISIBLE_DEVICES=1
  part profile_step_d12 110 110 python3 tutorials/profile_step.py --preset=speedrun --steps=3
  part decode_d12 55 55 python3 baselines/bench_decode.py --depth=12 --decode=64 --batches=1,16,64 \
    --out="$OUT/decode_d12.json"
  part decode_d20 55 3 python3 baselines/bench_decode.py --depth=20 --decode=64 --batches=1,16,64 \
    --out="$OUT/decode_d20.json"
}
ours & peer & wait
pack_results
cat "$OUT/summary.txt"
grep -h -E "CORE |packed|one_by_one|first 10|tokens fed|Engine greedy|cuda_graph|eager" "$OUT"/*.log | tail -40
