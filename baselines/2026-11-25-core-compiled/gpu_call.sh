#!/usr/bin/env bash
# One device call on two H100s of one host (nvidia-h100-x2): full CORE passes (notebook 04, the 18 tasks of
# ../shared/data/core) with the layers compiled for inference, at depth 20 on GPU 0 and depth 12 on GPU 1, with the
# depth-12 pass also run eagerly (--compile=false) in the same call, and a profile of compiled depth-20 scoring.
# Checkpoints: 1 training step at depth 20, 2 at depth 12 (speed, not score). Artifacts as in
# ../2026-11-25-pipeline/gpu_call.sh (.gpu/home.tar.xz, built on a CPU by notebooks 01 and 02).
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-compiled/gpu_call.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
unpack_home /tmp/stack20  # the depth-20 runs' own STACK_HOME

deep() {
  export CUDA_VISIBLE_DEVICES=0 STACK_HOME=/tmp/stack20
  checkpoint 20 1 150
  core 04_core_d20 300 3 --run_name=ours_d20 --compare_examples=10 --compile=true
}
shallow() {
  export CUDA_VISIBLE_DEVICES=1
  part profile_core_d20 100 300 python3 baselines/profile_core.py --depth=20 --compile=1 --rows=30
  checkpoint 12 2 90
  core 04_core_d12 150 100 --run_name=ours_d12 --compare_examples=10 --compile=true
  core 04_core_d12_eager 110 3 --run_name=ours_d12 --compare_examples=0 --compile=false
}
deep & shallow & wait
pack_results 04_core_d20.json 04_core_d12.json 04_core_d12_eager.json
cat "$OUT/summary.txt"
grep -h -E "warm-up|CORE |packed|one_by_one|first 10|tokens fed|in [0-9.]+ s$|Error|error" "$OUT"/04*.log "$OUT"/profile*.log | tail -90
