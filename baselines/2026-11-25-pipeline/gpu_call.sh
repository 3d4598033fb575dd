#!/usr/bin/env bash
# One device call on two H100s of one host (nvidia-h100-x2), both busy at once:
#   GPU 0, the whole course after the tokenizer, timed notebook by notebook: 03 (our speedrun at depth 12, 60 steps
#          of 524,288 tokens, val bpb every 10, through baselines/bench_pretrain.py), 04 (full CORE pass of that
#          checkpoint, one task also one example at a time), 05 (SFT, chat evals before and after), 06 (RL on GSM8K,
#          pass@k before and after), 07 (one chat reply).
#   GPU 1, nanochat: base_train at depth 12 with its defaults and with a warm-up fit for 60 steps (val bpb every
#          10 on the same validation documents), base_eval (CORE) of the second, 100 examples per task; then our
#          decode benchmark at depths 12 and 20.
# The tokenizer and every shard were built on a CPU by notebooks 01 and 02 (see ../2026-11-25-vs-nanochat/README.md)
# and travel as .gpu/home.tar.xz. Each part has its own timeout, so a slow part never costs the ones after it.
# usage (repo root): OUT=<folder> bash baselines/2026-11-25-pipeline/gpu_call.sh LIMIT_SECONDS
source baselines/gpu_call_lib.sh "$@"
CHAT="--chat_tasks=gsm8k,humaneval,spelling --chat_gsm8k_source=$D/gsm8k --chat_words=$D/words/words_en.txt
      --chat_humaneval_source=$D/humaneval/human_eval.jsonl"

ours() {
  export CUDA_VISIBLE_DEVICES=0
  part 03_pretrain 200 330 python3 baselines/bench_pretrain.py --depth=12 --steps=60 --eval_every=10 --timeout=190 \
    --out="$OUT/vs" --data="$D/english" -- --warmup_steps=3 --cooldown_frac=0.5
  part 04_core_eval 140 200 python3 notebooks/04_core_eval.py --preset=speedrun --run_name=ours_d12 --compare_examples=10
  part 05_sft 150 80 python3 notebooks/05_sft.py --preset=speedrun --base_run=ours_d12 --chat_generate_examples=250 --chat_max_tokens=256 $CHAT
  part 06_rl 150 25 python3 notebooks/06_rl.py --preset=speedrun --steps=12 --eval_every=12 --eval_prompts=200 \
    --save_every=12
  part 07_chat 60 5 python3 notebooks/07_chat.py --preset=speedrun --chat=false
}
peer() {
  export CUDA_VISIBLE_DEVICES=1
  local eval="--eval-every=10 --eval-tokens=131072"
  part nanochat_d12 210 330 env ITERS=60 EXTRA="$eval" OUT="$OUT/vs/peer" DATA="$D" bash .gpu/peer/run.sh 12:bf16
  part nanochat_d12_warmup6 320 60 env ITERS=60 EXTRA="$eval --warmup-steps=6" CORE=1 CORE_MAX=100 \
    OUT="$OUT/vs/peer_warmup6" DATA="$D" bash .gpu/peer/run.sh 12:bf16
  part decode_d12 40 20 python3 baselines/bench_decode.py --depth=12 --batches=1,16,64,256 --out="$OUT/decode_d12.json"
  part decode_d20 40 5 python3 baselines/bench_decode.py --depth=20 --batches=1,16,64,256 --out="$OUT/decode_d20.json"
}
ours & peer & wait
timeout 60 python3 baselines/vs_nanochat.py --out="$OUT/vs" --depths 12 > "$OUT/vs/table.txt" 2>&1
for run in "$STACK_HOME"/runs/*/; do  # results, metrics and plots of every run (no checkpoints)
  mkdir -p "$OUT/runs/$(basename "$run")" && cp "$run"/*.json* "$run"/*.png "$OUT/runs/$(basename "$run")/" 2>/dev/null
done
pack_results vs/table.txt
cat "$OUT/vs/table.txt" "$OUT/summary.txt"; grep -h -E "tokens/s|CORE|chatcore|pass@1" "$OUT"/0*.log | tail -40
