#!/usr/bin/env bash
# DecoderStack against nanochat in one command: our record run (bench_pretrain.py, which runs
# notebooks/03_pretrain.py once per seed) and nanochat's base_train (the peer's run.sh), STEPS steps of 524,288
# tokens each with val bits per byte every EVAL_EVERY steps, on the same corpus; then one table
# (vs_nanochat.py): our time to nanochat's best bpb and to our own target, beside nanochat's time to its best.
#
# usage (repo root): bash baselines/vs_nanochat.sh DATA PEER [DEPTH]      (DEPTH default 12)
#   DATA  a corpus folder: train.jsonl.xz or .gz, and val.jsonl.gz (e.g. a copy of the books)
#   PEER  nanochat's folder with run.sh, nanochat/ and wheels/
# env: OUT (logs, JSON, table.txt, vs_nanochat.md, plots; default ./vs-out), STEPS (60), EVAL_EVERY (10),
#      SEEDS (ours, one after another; default 0,1), TARGET (ours, default bench_pretrain's 1.52),
#      OURS_ARGS (more bench_pretrain / 03_pretrain flags), PEER_ARGS (more base_train flags; a CPU smoke test:
#      '--max-seq-len=256 --device-batch-size=2 --total-batch-size=512'), PEER_WARMUP (also run nanochat with this many warm-up steps),
#      PEER_EVAL_TOKENS (nanochat's tokens per evaluation; default 196,608 = three of its 32 x 2048 batches,
#      within the books' validation split, so no validation token counts twice),
#      OURS_GPU and PEER_GPU (GPU indices: with both set, the two systems run at the same time, one per GPU;
#      otherwise one after the other), LIMIT (seconds for all of it, default 3600), STACK_HOME (ours; default a
#      folder per corpus under ~/.cache/decoderstack, so artifacts of another corpus are never reused).
set -u
DATA=$(cd "${1:?usage: bash baselines/vs_nanochat.sh DATA PEER [DEPTH]}" && pwd) || exit 1
PEER=$(cd "${2:?usage: bash baselines/vs_nanochat.sh DATA PEER [DEPTH]}" && pwd) || exit 1
DEPTH=${3:-12}
CORPUS=$(basename "$DATA")
OUT=$(mkdir -p "${OUT:-vs-out}" && cd "${OUT:-vs-out}" && pwd)
STEPS=${STEPS:-60}
EVAL_EVERY=${EVAL_EVERY:-10}
LIMIT=${LIMIT:-3600}
REPORT_SECONDS=60  # kept back for the table and plots
export STACK_HOME=${STACK_HOME:-$HOME/.cache/decoderstack/bench-$CORPUS}
export NANOCHAT_BASE_DIR=${NANOCHAT_BASE_DIR:-/tmp/nanochat-peer-$CORPUS}
PEER_EVAL="--eval-every=$EVAL_EVERY --eval-tokens=${PEER_EVAL_TOKENS:-196608}"

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  echo "data $DATA ($CORPUS), peer $PEER, depth $DEPTH, $STEPS steps, eval every $EVAL_EVERY, seeds ${SEEDS:-0,1}"
} 2>&1 | tee "$OUT/env.txt"

# Our tokenizer training needs rustbpe: where the machine lacks it, install the peer's wheel of it (only that one).
if ! python3 -c "import rustbpe" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ours-site "$PEER"/wheels/rustbpe-*.whl
  export PYTHONPATH="/tmp/ours-site${PYTHONPATH:+:$PYTHONPATH}"
fi

left() { echo $(( LIMIT - SECONDS - REPORT_SECONDS )); }
ours() {  # gpu (may be empty), seconds
  echo "=== ours d$DEPTH, seeds ${SEEDS:-0,1}: at most $2 s, from ${SECONDS}s"
  CUDA_VISIBLE_DEVICES=${1:-${CUDA_VISIBLE_DEVICES:-}} timeout -k 10 "$2" python3 baselines/bench_pretrain.py \
    --data="$DATA" --depth="$DEPTH" --steps="$STEPS" --eval_every="$EVAL_EVERY" --seeds="${SEEDS:-0,1}" \
    ${TARGET:+--target=$TARGET} --out="$OUT" ${OURS_ARGS:-} > "$OUT/ours_d$DEPTH.out" 2>&1
  echo "=== ours d$DEPTH: exit $? at ${SECONDS}s"; tail -n 3 "$OUT/ours_d$DEPTH.out"
}
peer() {  # gpu (may be empty), seconds, output folder, more base_train flags
  echo "=== nanochat d$DEPTH ($3): at most $2 s, from ${SECONDS}s"
  CUDA_VISIBLE_DEVICES=${1:-${CUDA_VISIBLE_DEVICES:-}} ITERS=$STEPS CORPUS=$CORPUS DATA=$(dirname "$DATA") \
    OUT="$OUT/$3" EXTRA="$PEER_EVAL ${PEER_ARGS:-} ${4:-}" timeout -k 10 "$2" bash "$PEER/run.sh" "$DEPTH:bf16" > "$OUT/$3.out" 2>&1
  echo "=== nanochat d$DEPTH ($3): exit $? at ${SECONDS}s"; tail -n 3 "$OUT/$3.out"
}
peers() {  # gpu, seconds: nanochat's defaults, then the warm-up variant if asked for
  peer "$1" "$2" peer
  [ -n "${PEER_WARMUP:-}" ] && peer "$1" "$(left)" "peer_warmup$PEER_WARMUP" "--warmup-steps=$PEER_WARMUP"
}

if [ -n "${OURS_GPU:-}" ] && [ -n "${PEER_GPU:-}" ]; then
  T=$(left)
  ours "$OURS_GPU" "$T" &
  peers "$PEER_GPU" "$T"
  wait
else
  ours "" $(( $(left) / 2 ))
  peers "" "$(left)"
fi

timeout 120 python3 baselines/vs_nanochat.py --out="$OUT" --depths "$DEPTH" | tee "$OUT/table.txt"
echo "=== done at ${SECONDS}s"
