#!/usr/bin/env bash
# Device call A (nvidia-h100-x2, carry [".parts/p1", ".gpu/mini.tar.xz"]): keeps .parts/p1 (the first part of the
# CUTLASS DSL cu13 wheel, too large to travel with the rest) in /tmp/p1 for call B, and compares inductor settings
# of the compiled evaluation graph: depth 20, random weights, FlashAttention-2 (varlen), the first 1,200
# language-identification examples (2.1 M tokens fed), three timed passes each after a warm-up pass.
# GPU 0: addmm kept fused (the setting before this record), then + coordinate-descent tuning of the elementwise
# kernels. GPU 1: unfused addmm (EVAL_INDUCTOR_OPTIONS), then + max-autotune of the GEMMs (Triton templates, which
# can take the ReLU² as an epilogue).
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-60s/call_a.sh LIMIT_SECONDS
cp -r .parts/p1 /tmp/p1
source baselines/gpu_call_lib.sh "$@" 2>/dev/null
tar xJf .gpu/mini.tar.xz -C "$STACK_HOME" && echo "mini shards unpacked at ${SECONDS}s" | tee -a "$OUT/summary.txt"
export TORCHINDUCTOR_COMPILE_THREADS=16
variant() {  # log name, cap, flags...
  local name=$1 cap=$2; shift 2
  part "$name" "$cap" 3 python3 baselines/profile_core.py --depth=20 --examples=1200 --timed=3 "$@"
}
gpu0() {
  export CUDA_VISIBLE_DEVICES=0
  variant fused 200 --rows=30 --attention=varlen --inductor=keep_addmm_fused_for_half_dtypes=True
  variant cdt 250 --rows=0 --attention=varlen --inductor=coordinate_descent_tuning=True
}
gpu1() {
  export CUDA_VISIBLE_DEVICES=1
  variant unfused 200 --rows=30 --attention=varlen
  variant autotune 330 --rows=0 --attention=varlen --inductor=max_autotune_gemm=True
}
gpu0 & gpu1 & wait
ls -la /tmp/p1 >> "$OUT/summary.txt"
pack_results
cat "$OUT/summary.txt"
grep -h "timed passes\|under the profiler\|Error" "$OUT"/*.log
