# What every device-call script of baselines/<date>-*/gpu_call.sh starts with; source it from the repo root:
#     source baselines/gpu_call_lib.sh "$@"        (its first argument is LIMIT, the call's seconds)
# It sets LIMIT, FINAL (the device tool's $OUT, where the results go back), OUT (a scratch folder for logs) and D
# (the carried data), unpacks the artifacts built on a CPU (.gpu/home.tar.xz) into STACK_HOME, writes env.txt, and
# defines `part` (one step with its own timeout, so a slow step never costs the ones after it), `checkpoint` (a short
# training run that leaves a checkpoint), `core` (notebook 04), `unpack_home`, `install_fa4` and `pack_results`.
set -u
LIMIT=${1:-580}
FINAL=${OUT:-$PWD/gpu-out}
OUT=/tmp/gpu-call
export STACK_HOME=/tmp/stack
D=$PWD/.gpu/data
mkdir -p "$OUT/vs" "$STACK_HOME"
left() { echo $(( LIMIT - SECONDS )); }
part() {  # log name, cap seconds, reserve seconds, command...: run with min(cap, time left - reserve) seconds
  local name=$1 cap=$2 reserve=$3; shift 3
  local t=$(( $(left) - reserve )); [ "$t" -gt "$cap" ] && t=$cap
  [ "$t" -gt 10 ] || { echo "=== $name skipped: ${t}s" | tee -a "$OUT/summary.txt"; return; }
  echo "=== $name: timeout ${t}s, start ${SECONDS}s" | tee -a "$OUT/summary.txt"
  timeout -k 5 "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "=== $name: exit $? at ${SECONDS}s" | tee -a "$OUT/summary.txt"
}
checkpoint() {  # depth, steps, cap seconds: a short run of 03 (bench_pretrain) that leaves a checkpoint to score
  part 03_d$1 "$3" 3 python3 baselines/bench_pretrain.py --depth="$1" --steps="$2" --eval_every="$2" \
    --timeout=$(( $3 - 10 )) --out="$OUT/vs" --data="$D/english"
}
core() {  # log name, cap, reserve, flags...: notebook 04 (speedrun preset, benchmark timings on), its summary.json
  # kept as OUT/<name>.json
  local name=$1 cap=$2 reserve=$3; shift 3
  part "$name" "$cap" "$reserve" python3 notebooks/04_core_eval.py --preset=speedrun --benchmark=true "$@"
  cp "$STACK_HOME/runs/04_core_eval/summary.json" "$OUT/$name.json" 2>/dev/null
}
unpack_home() {  # folders: each gets the artifacts of .gpu/home.tar.xz, to serve as a STACK_HOME of its own
  for home in "$@"; do mkdir -p "$home" && tar xJf .gpu/home.tar.xz -C "$home"; done
}
FA4_PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages  # where install_fa4 puts FlashAttention-4
install_fa4() {  # folder of the cu13 wheel's first part (60 MB, carried alone by an earlier call or this one):
  # FlashAttention-4 and the CUTLASS DSL from .parts/p2's wheels into /tmp/site; use with PYTHONPATH=$FA4_PYTHONPATH
  local wheel=/tmp/w/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
  mkdir -p /tmp/w && cat "$1/cu13.part.aa" .parts/p2/cu13.part.ab > $wheel
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .parts/p2/*.whl \
    $wheel > "$OUT/pip.log" 2>&1; echo "pip: $? at ${SECONDS}s" | tee -a "$OUT/summary.txt"
}
pack_results() {  # files under OUT to send back beside the archive of everything
  mkdir -p "$FINAL" && tar czf "$FINAL/gpu_call.tgz" -C "$OUT" . && (cd "$OUT" && cp summary.txt "$@" "$FINAL/")
}
unpack_home "$STACK_HOME" && echo "artifacts unpacked at ${SECONDS}s" | tee "$OUT/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
  git rev-parse HEAD; git status --short | head; } > "$OUT/env.txt" 2>&1
