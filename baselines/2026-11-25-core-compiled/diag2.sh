#!/usr/bin/env bash
# Third device call (nvidia-h100-x2), after a call that only carried .parts/p1 (the first 60 MB of the
# nvidia-cutlass-dsl-libs-cu13 wheel; .parts/p2 holds the rest and FlashAttention-4's other wheels).
# GPU 0: FlashAttention-4 (flash-attn-4 4.0.0b36) installed, checked against SDPA, then the depth-20 scoring profile
# on it. GPU 1: a Chrome trace of compiled depth-20 scoring (where the memsets and device copies come from) and the
# profile with cuBLAS instead of cuBLASLt.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-compiled/diag2.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
install_fa4 .parts/p1
fa4() { PYTHONPATH=$FA4_PYTHONPATH "$@"; }
first() {
  export CUDA_VISIBLE_DEVICES=0
  part fa4_check 150 100 fa4 python3 -c "import sys, time; sys.path.insert(0, '.'); t = time.time()
import flash_attn.cute, stackcore as sc; print('import', time.time() - t)
print(sc._flash_varlen_function(), sc.available_attention_backends('cuda'), time.time() - t)"
  part profile_flash 150 3 fa4 python3 baselines/profile_core.py --depth=20 --attention=flash --rows=30
}
second() {
  export CUDA_VISIBLE_DEVICES=1
  part trace 80 120 python3 baselines/profile_core.py --depth=20 --examples=20 --rows=3 --trace="$OUT/trace.json"
  gzip -f "$OUT/trace.json"
  part cublas 90 3 python3 -c "import torch, runpy, sys; torch.backends.cuda.preferred_blas_library('cublas')
sys.argv = ['profile_core.py', '--depth=20', '--rows=30']; runpy.run_path('baselines/profile_core.py', run_name='__main__')"
}
first & second & wait
pack_results fa4_check.log profile_flash.log cublas.log trace.json.gz
cat "$OUT/summary.txt"
grep -h "tokens fed\|import\|Error" "$OUT"/*.log | tail -20
