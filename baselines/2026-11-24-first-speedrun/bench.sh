#!/bin/bash
# Device-side driver. call1: speed table (d12 auto, d20, d12 flex); call2: a d12 curve run sized to the call.
# Expects STACK_HOME, PYTHONPATH (rustbpe) and $OUT set by the caller; runs from the repo root.
set -u
D=baselines/2026-11-24-first-speedrun
LIMIT=${LIMIT:-585}   # seconds of the call we may use
CORPUS="--preset=speedrun --corpus=local --local_files=.gpu/data/english/train.jsonl.gz --local_val_files=.gpu/data/english/val.jsonl.gz"
left() { echo $((LIMIT - SECONDS)); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  if [ ! -d "$STACK_HOME/shards" ]; then
    python3 notebooks/01_tokenizer.py $CORPUS --heldout_docs=130
    python3 notebooks/02_sharding.py $CORPUS --workers=8
  else echo "artifacts already in $STACK_HOME"; fi
  [ "$1" = call1 ] && python3 $D/matmul.py
  echo "prep done at ${SECONDS}s"
} 2>&1 | tee -a $OUT/env.log
train() {  # name timeout args...
  local name=$1 t=$2; shift 2
  echo "=== $name: timeout ${t}s; args $*; start ${SECONDS}s" | tee $OUT/$name.log
  TORCH_LOGS=recompiles timeout -k 5 $t python3 notebooks/03_pretrain.py --preset=speedrun --eval_every=100000 \
    --save_every=100000 --eval_tokens=524288 --resume=false --run_name=$name "$@" 2>&1 | tee -a $OUT/$name.log
  echo "=== $name: rc ${PIPESTATUS[0]} end ${SECONDS}s" | tee -a $OUT/$name.log
  cp $OUT/$name.log $STACK_HOME/ 2>/dev/null
}
if [ "$1" = call1 ]; then
  train d12_auto 190 --depth=12 --steps=25
  train d20 $(( $(left) - 150 > 230 ? 230 : $(left) - 150 )) --depth=20 --steps=20
  if grep -q OutOfMemoryError $OUT/d20.log; then
    train d20_mt32k $(( $(left) - 120 )) --depth=20 --steps=20 --micro_tokens=32768
  fi
  if ! grep -q "attention backend: flex" $OUT/d12_auto.log && [ $(left) -gt 60 ]; then
    train d12_flex $(( $(left) - 5 )) --depth=12 --steps=25 --attention=flex
  fi
  python3 $D/parse.py $OUT/env.log $OUT/d*.log > $OUT/table.txt 2>&1; cat $OUT/table.txt
elif [ "$1" = call3 ]; then
  train d20_full $(( $(left) - 10 )) --depth=20 --steps=20
  python3 $D/parse.py $OUT/d20_full.log > $OUT/table.txt 2>&1; tail -3 $OUT/table.txt
else
  # step time from call 1 (median of steps > 5) if this machine still has it, else 1.0 s
  ST=$(python3 - <<'PY'
import re, statistics, os
try:
    t = open(os.environ["STACK_HOME"] + "/d12_auto.log").read().replace(",", "")
    ms = [float(m) for s, m in re.findall(r"step\s+(\d+)/\d+ \| loss .*? \| (\d+) ms", t) if int(s) > 5]
    print(statistics.median(ms) / 1e3)
except Exception:
    print(1.0)
PY
)
  WARM=$([ -f $STACK_HOME/d12_auto.log ] && echo 1 || echo 0)
  N=$(python3 -c "print(max(50, int(($(left) - (${OVH:-160} if $WARM else 200)) / ($ST * 1.04))))")
  E=$(( N / 12 > 1 ? N / 12 : 1 ))
  echo "step time ${ST}s (warm=$WARM), left $(left)s -> steps $N, eval_every $E" | tee -a $OUT/env.log
  train d12_curve $(( $(left) - 5 )) --depth=12 --steps=$N --eval_every=$E
  cp $STACK_HOME/runs/d12_curve/metrics.jsonl $STACK_HOME/runs/d12_curve/summary.json $STACK_HOME/runs/d12_curve/curves.png $OUT/ 2>/dev/null
  python3 $D/parse.py $OUT/d12_curve.log > $OUT/table.txt 2>&1; tail -3 $OUT/table.txt
fi
