#!/usr/bin/env bash
# DecoderStack against nanochat on this GPU in one command: for each depth, our speedrun (bench_pretrain.py, which
# runs notebooks/03_pretrain.py) and nanochat's base_train (the peer's run.sh), each STEPS steps of 524,288 tokens
# with val bits per byte every EVAL_EVERY steps on the same 130 validation documents, each with its own schedule
# for that horizon; then one table with the ratios and the curves (vs_nanochat.py). Every part has its own
# timeout, and the table is printed whatever finished.
#
# usage (repo root, STACK_HOME set): bash baselines/vs_nanochat.sh LIMIT_SECONDS [DEPTH ...]     (default: 12)
# env: PEER   nanochat's folder with run.sh and wheels/ (default .gpu/peer)
#      DATA   folder with english/{train,val}.jsonl.gz and core/ (default .gpu/data)
#      OUT    where logs, JSON, the table (table.txt, vs_nanochat.md) and plots go (default ./vs-out)
#      STEPS (60), EVAL_EVERY (10), PEER_EVAL_TOKENS (131072: two of nanochat's 32 x 2048 batches)
#      OURS_ARGS  more 03_pretrain flags (default: a schedule for a 60-step horizon)
#      PEER_WARMUP  also run nanochat with this many warm-up steps (its default, 40, is meant for far longer runs)
set -u
LIMIT=${1:?usage: bash baselines/vs_nanochat.sh LIMIT_SECONDS [DEPTH ...]}
shift
DEPTHS=${*:-12}
PEER=$(cd "${PEER:-.gpu/peer}" && pwd) || exit 1
DATA=$(cd "${DATA:-.gpu/data}" && pwd) || exit 1
OUT=${OUT:-$PWD/vs-out}
mkdir -p "$OUT"
STEPS=${STEPS:-60}
EVAL_EVERY=${EVAL_EVERY:-10}
PEER_EVAL_TOKENS=${PEER_EVAL_TOKENS:-131072}
OURS_ARGS=${OURS_ARGS:---warmup_steps=3 --cooldown_frac=0.5}
PEER_WARMUP=${PEER_WARMUP:-}
REPORT_SECONDS=40  # kept back for the table and plots

# Each part's timeout is its weight's share of the time left (less the report): ours 3, nanochat 3, variant 2.
# Ours usually needs well under its share (about 2 minutes at d12 on an H100), and what it leaves goes to the next.
WARM_WEIGHT=0
[ -n "$PEER_WARMUP" ] && WARM_WEIGHT=2
REMAINING=$(( $(echo $DEPTHS | wc -w) * (6 + WARM_WEIGHT) ))  # weights of the parts not run yet
next_timeout() {  # weight -> T (seconds for this part)
  T=$(( (LIMIT - SECONDS - REPORT_SECONDS) * $1 / REMAINING ))
  REMAINING=$(( REMAINING - $1 ))
}

{
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null && git status --short | head -20
} 2>&1 | tee "$OUT/env.txt"

# Our tokenizer training needs rustbpe: where the machine lacks it, install the peer's wheel of it (only that one).
if ! python3 -c "import rustbpe" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ours-site "$PEER"/wheels/rustbpe-*.whl
  export PYTHONPATH="/tmp/ours-site${PYTHONPATH:+:$PYTHONPATH}"
fi

for depth in $DEPTHS; do
  next_timeout 3
  echo "=== ours d$depth: timeout ${T}s, at ${SECONDS}s"
  timeout -k 10 "$T" python3 baselines/bench_pretrain.py --depth="$depth" --steps="$STEPS" --eval_every="$EVAL_EVERY" \
    --timeout=$(( T - 10 )) --out="$OUT" --data="$DATA/english" -- $OURS_ARGS
  echo "=== ours d$depth: exit $? at ${SECONDS}s"

  next_timeout 3
  echo "=== nanochat d$depth: timeout ${T}s, at ${SECONDS}s"
  ITERS=$STEPS EXTRA="--eval-every=$EVAL_EVERY --eval-tokens=$PEER_EVAL_TOKENS" OUT="$OUT/peer" DATA="$DATA" \
    timeout -k 10 "$T" bash "$PEER/run.sh" "$depth:bf16"
  echo "=== nanochat d$depth: exit $? at ${SECONDS}s"

  if [ -n "$PEER_WARMUP" ]; then
    next_timeout 2
    echo "=== nanochat d$depth, warm-up $PEER_WARMUP: timeout ${T}s, at ${SECONDS}s"
    ITERS=$STEPS EXTRA="--eval-every=$EVAL_EVERY --eval-tokens=$PEER_EVAL_TOKENS --warmup-steps=$PEER_WARMUP" \
      OUT="$OUT/peer_warmup$PEER_WARMUP" DATA="$DATA" timeout -k 10 "$T" bash "$PEER/run.sh" "$depth:bf16"
    echo "=== nanochat d$depth, warm-up $PEER_WARMUP: exit $? at ${SECONDS}s"
  fi
done

timeout 120 python3 baselines/vs_nanochat.py --out="$OUT" --depths $DEPTHS | tee "$OUT/table.txt"
echo "=== done at ${SECONDS}s"
