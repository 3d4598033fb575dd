#!/usr/bin/env bash
# Second device call (nvidia-h100-x2): where compiled depth-20 CORE scoring still spends its time, after the last
# layer keeps only scored rows and the weights are stored in bf16. GPU 0: the op table of the first 200
# bigbench_language_identification examples; GPU 1: the Python stacks of memory copies and sets, and inductor's
# generated code for a depth-4 model (TORCH_LOGS=output_code).
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-core-compiled/diag.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
first() {
  export CUDA_VISIBLE_DEVICES=0
  part profile_core_d20 110 3 python3 baselines/profile_core.py --depth=20 --rows=40
}
second() {
  export CUDA_VISIBLE_DEVICES=1
  part stacks_d20 70 50 python3 baselines/profile_core.py --depth=20 --examples=40 --stacks=1 --rows=3
  TORCH_LOGS=output_code part code_d4 45 3 python3 baselines/profile_core.py --depth=4 --examples=5 --rows=3
}
first & second & wait
pack_results profile_core_d20.log stacks_d20.log code_d4.log
cat "$OUT/summary.txt"
grep -h "tokens fed" "$OUT"/*.log
