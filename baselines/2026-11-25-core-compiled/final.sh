#!/usr/bin/env bash
# Last device call (nvidia-h100-x2), after one that copied .parts/p1 to /tmp/p1 there (see diag2.sh): full CORE
# passes of notebook 04 (18 tasks of ../shared/data/core, compiled layers, first 10 examples of each task also one
# at a time). GPU 0: a 1-step depth-20 checkpoint, then its pass on the varlen backend (no flash-attn).
# GPU 1: a 2-step depth-12 checkpoint and its pass (varlen), then the depth-20 checkpoint's pass on FlashAttention-4.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-compiled/final.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
unpack_home /tmp/stack20 /tmp/stack12
install_fa4 /tmp/p1
D20=/tmp/stack20/checkpoints/ours_d20/step_000001.pt
deep() {
  export CUDA_VISIBLE_DEVICES=0 STACK_HOME=/tmp/stack20
  checkpoint 20 1 150
  core 04_core_d20 220 3 --compile=true --compare_examples=10 --run_name=ours_d20 --attention=varlen
}
shallow() {
  export CUDA_VISIBLE_DEVICES=1 STACK_HOME=/tmp/stack12
  checkpoint 12 2 100
  core 04_core_d12 110 190 --compile=true --compare_examples=10 --run_name=ours_d12 --attention=varlen
  while [ ! -f $D20 ] && [ "$(left)" -gt 200 ]; do sleep 2; done
  export PYTHONPATH=$FA4_PYTHONPATH
  core 04_core_d20_fa4 240 3 --compile=true --compare_examples=10 --checkpoint=$D20 --attention=flash
}
deep & shallow & wait
pack_results 04_core_d20.json 04_core_d12.json 04_core_d20_fa4.json
cat "$OUT/summary.txt"
grep -h -E "warm-up|CORE |packed|one_by_one|first 10|in [0-9.]+ s$|Error|error" "$OUT"/04*.log | grep -v Warning | tail -90
