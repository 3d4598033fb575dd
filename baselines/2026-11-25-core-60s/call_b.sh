#!/usr/bin/env bash
# Device call B (nvidia-h100-x2, carry [".parts/p2", ".gpu/home.tar.xz"]), right after call A on the same machine
# (call A left the wheel's first part in /tmp/p1): installs FlashAttention-4 (flash-attn-4 4.0.0b36, CUTLASS DSL
# 4.8.1) and runs notebook 04 in full (18 tasks, compiled layers, first 10 examples of each task also one at a time)
# on randomly initialised checkpoints (random_checkpoint.py: a pass costs the same whatever the weights).
# GPU 0: depth 20 on FlashAttention-4 (--attention=flash), then depth 20 on FlashAttention-2 (varlen), the baseline
# in the same call. GPU 1 (8 compile threads): call A's language-identification timing on FlashAttention-4, with its
# profile, then depth 12 on FlashAttention-4.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-60s/call_b.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
unpack_home /tmp/stack20 /tmp/stack12
install_fa4 /tmp/p1
export PYTHONPATH=$FA4_PYTHONPATH
python3 -c "import flash_attn.cute, stackcore as sc; print(sc._flash_varlen_function().__module__)" >> "$OUT/env.txt" 2>&1
random_checkpoint() {  # depth
  part ckpt_d$1 60 3 python3 baselines/2026-11-25-core-60s/random_checkpoint.py --depth=$1 --run_name=ours_d$1
}
deep() {
  export CUDA_VISIBLE_DEVICES=0 STACK_HOME=/tmp/stack20
  random_checkpoint 20
  core 04_core_d20_fa4 260 3 --compile=true --compare_examples=10 --run_name=ours_d20 --attention=flash
  core 04_core_d20_fa2 260 3 --compile=true --compare_examples=10 --run_name=ours_d20 --attention=varlen
}
shallow() {
  export CUDA_VISIBLE_DEVICES=1 STACK_HOME=/tmp/stack12 TORCHINDUCTOR_COMPILE_THREADS=8
  random_checkpoint 12
  part fa4_unfused 150 3 python3 baselines/profile_core.py --depth=20 --examples=1200 --timed=3 --rows=30 \
    --attention=flash
  core 04_core_d12_fa4 200 3 --compile=true --compare_examples=10 --run_name=ours_d12 --attention=flash
}
deep & shallow & wait
pack_results 04_core_d20_fa4.json 04_core_d20_fa2.json 04_core_d12_fa4.json
cat "$OUT/summary.txt"
grep -h "timed passes\|under the profiler" "$OUT"/*.log
grep -h -E "warm-up|CORE |packed|one_by_one|first 10|in [0-9.]+ s$|Error|error" "$OUT"/04*.log | grep -v Warning | tail -90
