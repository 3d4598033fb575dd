#!/usr/bin/env bash
# One device call on two H100s of one host (nvidia-h100-x2), both busy at once:
#   GPU 0, ours: the speedrun at depth 12 (60 steps, the schedule of ../2026-11-25-pipeline) and a full CORE pass of
#          that checkpoint; the speedrun at depth 20 (nanochat's width: 1,280, head dim 128; seq 2048, 524,288
#          tokens per step) for 15 steps and a full CORE pass of that checkpoint (speed, not score). Each CORE pass
#          also scores the first 50 examples of every task one prompt at a time.
#   GPU 1, nanochat: base_train at depth 20 in bf16 and in fp8, 15 steps each, its defaults otherwise; then our
#          decode benchmark at depths 12 and 20 and a profile of one depth-12 training step.
# Artifacts as in ../2026-11-25-pipeline/gpu_call.sh (.gpu/home.tar.xz, built on a CPU by notebooks 01 and 02).
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-d20/gpu_call.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"

ours() {
  export CUDA_VISIBLE_DEVICES=0
  part 03_d12 170 400 python3 baselines/bench_pretrain.py --depth=12 --steps=60 --eval_every=10 --timeout=165 \
    --out="$OUT/vs" --data="$D/english" -- --warmup_steps=3 --cooldown_frac=0.5
  part 04_core_d12 120 290 python3 notebooks/04_core_eval.py --preset=speedrun --run_name=ours_d12
  cp "$STACK_HOME/runs/04_core_eval/results.json" "$OUT/core_d12.json" 2>/dev/null
  part 03_d20 170 120 python3 baselines/bench_pretrain.py --depth=20 --steps=15 --eval_every=15 --timeout=165 \
    --out="$OUT/vs" --data="$D/english"
  if grep -q "OutOfMemoryError" "$OUT/03_d20.log"; then  # half the micro-batch, two accumulation steps
    mv "$OUT/03_d20.log" "$OUT/03_d20_oom.log"
    part 03_d20 170 120 python3 baselines/bench_pretrain.py --depth=20 --steps=15 --eval_every=15 --timeout=165 \
      --out="$OUT/vs" --data="$D/english" -- --micro_tokens=32768
  fi
  part 04_core_d20 200 3 python3 notebooks/04_core_eval.py --preset=speedrun --run_name=ours_d20
  cp "$STACK_HOME/runs/04_core_eval/results.json" "$OUT/core_d20.json" 2>/dev/null
}
peer() {
  export CUDA_VISIBLE_DEVICES=1
  part nanochat_d20_bf16 230 330 env ITERS=15 OUT="$OUT/vs/peer" DATA="$D" bash .gpu/peer/run.sh 20:bf16
  part nanochat_d20_fp8 200 130 env ITERS=15 OUT="$OUT/vs/peer" DATA="$D" bash .gpu/peer/run.sh 20:fp8
  part decode_d12 50 80 python3 baselines/bench_decode.py --depth=12 --decode=128 --batches=1,16,64 \
    --out="$OUT/decode_d12.json"
  part decode_d20 50 45 python3 baselines/bench_decode.py --depth=20 --decode=128 --batches=1,16,64 \
    --out="$OUT/decode_d20.json"
  part profile_d12 45 3 python3 tutorials/profile_step.py --preset=speedrun --steps=3
}
ours & peer & wait
timeout 60 python3 baselines/vs_nanochat.py --out="$OUT/vs" --depths 20 > "$OUT/vs/table.txt" 2>&1
pack_results vs/table.txt
cat "$OUT/vs/table.txt" "$OUT/summary.txt"
grep -h -E "steady state|Peak memory|tokens/s|examples/s|CORE" "$OUT"/*.log "$OUT"/vs/peer/*.log 2>/dev/null | tail -40
