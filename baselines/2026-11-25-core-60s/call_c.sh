#!/usr/bin/env bash
# Device call C (nvidia-h100-x2, carry [".parts/p2", ".gpu/home.tar.xz"]), right after a call on the same machine
# that ran `cp -r .parts/p1 /tmp/p1` (carry [".parts/p1"]): installs FlashAttention-4 as in call B and runs notebook
# 04 in full (18 tasks, compiled layers, first 10 examples of each task also one at a time) at depth 20 on a
# randomly initialised checkpoint, on both GPUs at once, each process with 8 inductor compile threads:
# GPU 0 on FlashAttention-4 (--attention=flash), GPU 1 on FlashAttention-2 (varlen), the baseline in the same call.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-60s/call_c.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
unpack_home /tmp/stack_fa4 /tmp/stack_fa2
install_fa4 /tmp/p1
export PYTHONPATH=$FA4_PYTHONPATH TORCHINDUCTOR_COMPILE_THREADS=8
run_d20() {  # gpu, attention backend, cap seconds
  export CUDA_VISIBLE_DEVICES=$1 STACK_HOME=/tmp/stack_$2
  part ckpt_$2 60 3 python3 baselines/2026-11-25-core-60s/random_checkpoint.py --depth=20 --run_name=ours_d20
  core 04_core_d20_$2 "$3" 3 --compile=true --compare_examples=10 --run_name=ours_d20 \
    --attention=$([ "$2" = fa4 ] && echo flash || echo varlen)
}
run_d20 0 fa4 480 & run_d20 1 fa2 420 & wait
pack_results 04_core_d20_fa4.json 04_core_d20_fa2.json
cat "$OUT/summary.txt"
grep -h -E "attention |warm-up|CORE |packed|one_by_one|first 10|in [0-9.]+ s$|Error|error" "$OUT"/04*.log | grep -v Warning | tail -90
