#!/usr/bin/env bash
# Last device call (nvidia-h100-x2): full CORE passes of notebook 04 (18 tasks of ../shared/data/core, compiled
# layers, first 10 examples of each task also one at a time) with evaluation compiled as one graph over all layers.
# GPU 0: a 1-step depth-20 checkpoint and its pass; GPU 1: a 2-step depth-12 checkpoint and its pass, done before
# the depth-20 pass starts (GPU 1's compile workers capped at 8 threads). Both on varlen, no flash-attn.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-compiled/final2.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
unpack_home /tmp/stack20 /tmp/stack12
deep() {
  export CUDA_VISIBLE_DEVICES=0 STACK_HOME=/tmp/stack20
  checkpoint 20 1 150
  core 04_core_d20 270 3 --compile=true --compare_examples=10 --run_name=ours_d20 --attention=varlen
}
shallow() {
  export CUDA_VISIBLE_DEVICES=1 STACK_HOME=/tmp/stack12 TORCHINDUCTOR_COMPILE_THREADS=8
  checkpoint 12 2 90
  core 04_core_d12 130 3 --compile=true --compare_examples=10 --run_name=ours_d12 --attention=varlen
}
deep & shallow & wait
pack_results 04_core_d20.json 04_core_d12.json
cat "$OUT/summary.txt"
grep -h -E "warm-up|CORE |packed|one_by_one|first 10|in [0-9.]+ s$|Error|error" "$OUT"/04*.log | grep -v Warning | tail -70
