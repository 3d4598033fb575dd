#!/usr/bin/env bash
# The one device call behind this record (one H100, about 9 minutes of device time in all). In order of priority,
# each part with its own timeout so a slow part never costs the ones after it:
#   1. baselines/vs_nanochat.sh: our speedrun and nanochat's base_train at depth 12, 60 steps each, val bpb every 10;
#   2. notebooks/04_core_eval.py: a full CORE pass over the 18 tasks of ../shared/data/core with our checkpoint;
#   3. baselines/bench_decode.py, bench_sft.py, bench_rl.py at depth 12.
# The tokenizer and every shard (pretraining, CORE, SFT, GSM8K) were built on a CPU beforehand by notebooks 01 and
# 02 from ../shared/data (see README.md here) and travel packed as .gpu/home.tar.xz, so no device time goes to them.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-vs-nanochat/gpu_call.sh LIMIT_SECONDS
# Everything ends up in OUT/gpu_call.tgz (the device tool returns only a few files) plus OUT/summary.txt.
set -u
LIMIT=${1:-535}
FINAL=${OUT:-$PWD/gpu-out}
OUT=/tmp/gpu-call
export STACK_HOME=${STACK_HOME:-/tmp/stack}
mkdir -p "$OUT" "$STACK_HOME"
left() { echo $(( LIMIT - SECONDS )); }
part() {  # name seconds command...: run with a timeout, log to $OUT/name.log
  local name=$1 t=$2; shift 2
  [ "$t" -gt 10 ] || { echo "=== $name skipped: ${t}s left" | tee -a "$OUT/summary.txt"; return; }
  echo "=== $name: timeout ${t}s, start ${SECONDS}s" | tee -a "$OUT/summary.txt"
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? at ${SECONDS}s" | tee -a "$OUT/summary.txt"
}
tar xJf .gpu/home.tar.xz -C "$STACK_HOME" && echo "artifacts unpacked at ${SECONDS}s" | tee "$OUT/summary.txt"
python3 -c "import rustbpe" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile \
  --target /tmp/ours-site .gpu/peer/wheels/rustbpe-*.whl; export PYTHONPATH=/tmp/ours-site; }

part vs_nanochat $(( $(left) - 185 )) env OUT="$OUT/vs" bash baselines/vs_nanochat.sh $(( $(left) - 190 )) 12
part core_d12 $(( $(left) - 100 > 100 ? 100 : $(left) - 100 )) python3 notebooks/04_core_eval.py --preset=speedrun \
  --run_name=ours_d12 --compare_tasks=1
part decode_d12 $(( $(left) - 65 > 40 ? 40 : $(left) - 65 )) python3 baselines/bench_decode.py --depth=12 \
  --out="$OUT/decode_d12.json"
part sft_d12 $(( $(left) - 35 > 35 ? 35 : $(left) - 35 )) python3 baselines/bench_sft.py --depth=12 --steps=8 \
  --warmup=2 --shards="$STACK_HOME/shards/sft" --out="$OUT/sft_d12.json"
part rl_d12 $(( $(left) - 3 )) python3 baselines/bench_rl.py --depth=12 --repeats=2 --out="$OUT/rl_d12.json"
cp "$STACK_HOME"/runs/04_core_eval/results.json "$OUT/core_d12.json" 2>/dev/null
mkdir -p "$FINAL" && tar czf "$FINAL/gpu_call.tgz" -C "$OUT" . && cp "$OUT/summary.txt" "$FINAL/"
tail -n 40 "$OUT"/vs/table.txt 2>/dev/null; cat "$OUT/summary.txt"
