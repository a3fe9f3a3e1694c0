#!/usr/bin/env bash
# One-shot smoke test of the CUDA path (< 8 min on one GPU): the checks that retire its biggest risks,
# one PASS/FAIL/SKIP line each, logs in OUT/<check>.log. Exit status: the number of FAILs (0 = all passed).
#
#   TREC_RANK_VARIANT=cuda make bootstrap && scripts/gpu_smoke.sh        # on a GPU node
#   scripts/gpu_smoke.sh --device cpu                                      # same checks on CPU, GPU-only ones SKIP
#
# Options: --device cuda|cpu (default cuda), --data DIR (ml-100k root; prepared there when missing,
# default data/ml-100k), --out DIR (default runs/gpu_smoke, emptied first), --steps N (DIN steps; default
# 200 on cuda, 16 on cpu; HSTU runs N/2).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda DATA=data/ml-100k OUT=runs/gpu_smoke STEPS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    *) echo "gpu_smoke: unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_smoke: --device must be cuda or cpu" >&2; exit 2 ;; esac
STEPS=${STEPS:-$([ "$DEVICE" = cuda ] && echo 200 || echo 16)}
HALF=$((STEPS / 2)) HSTU_STEPS=$((STEPS / 2))
PY=.venv/bin/python; [ -x "$PY" ] || PY=python
TR=("$PY" -m trec_rank.cli)
DIN=configs/ml100k_din.yaml
ON_DEVICE=(--set "sharding.device=$DEVICE" --set "data.path=$DATA/ranking")
ON_CPU=(--set sharding.device=cpu --set "data.path=$DATA/ranking")
rm -rf "$OUT" && mkdir -p "$OUT"
FAILS=0

result() {  # STATUS NAME DETAIL
  printf '%-4s %-16s %s\n' "$1" "$2" "$3"
  [ "$1" = FAIL ] && FAILS=$((FAILS + 1))
  return 0
}

check() {  # NAME CMD...: PASS with the log's last line (or the line matching $SHOW), FAIL with its first error
  local name=$1; shift
  if "$@" > "$OUT/$name.log" 2>&1; then
    result PASS "$name" "$(if [ -n "${SHOW:-}" ]; then grep -m1 -E "$SHOW" "$OUT/$name.log"; else tail -n1 "$OUT/$name.log"; fi)"
  else
    result FAIL "$name" "$( (grep -m1 -E '^error:|Error|FAIL' "$OUT/$name.log" || tail -n1 "$OUT/$name.log") | cut -c1-300)"
  fi
}

gpu_only() {  # NAME: SKIP it on --device cpu
  [ "$DEVICE" = cuda ] && return 0
  result SKIP "$1" "needs a GPU (--device cpu)"
  return 1
}

has_step() {  # RUN_DIR STEP: the run holds a checkpoint of that step (step-00000200)
  local dir
  for dir in "$1"/checkpoints/step-*; do
    [ -d "$dir" ] && [ $((10#${dir##*step-})) -eq "$2" ] && return 0
  done
  return 1
}

if [ ! -f "$DATA/_manifest.json" ]; then
  "${TR[@]}" data ml-100k --out "$DATA" > "$OUT/data.log" 2>&1 || { result FAIL data "$(tail -n1 "$OUT/data.log")"; exit 1; }
fi

# 1. What the run stands on.
if [ "$DEVICE" = cuda ]; then check device "$PY" scripts/gpu_smoke.py device
else result SKIP device "$("$PY" -c 'import torch; print(f"torch {torch.__version__}, no GPU asked for (--device cpu)")')"; fi
check install "$PY" scripts/check_install.py "$DEVICE"

# 2. Planning with the device's real memory, next to what sharding allocates there.
SHOW='totals:' check plan "${TR[@]}" plan "$DIN" --world-size 1 --local-world-size 1 --device "$DEVICE"
gpu_only memory && check memory "$PY" scripts/gpu_smoke.py memory "$DIN"

# 3. DIN: sparse Adam (GPU-only in fbgemm), then row-wise Adagrad with the pipeline, eval, checkpoint, resume.
gpu_only din-adam && SHOW='valid:' check din-adam "${TR[@]}" train "$DIN" --run-dir "$OUT/din_adam" "${ON_DEVICE[@]}" \
  --set train.max_steps="$STEPS" --set train.optim.sparse=adam
SHOW='valid:' check din "${TR[@]}" train "$DIN" --run-dir "$OUT/din" "${ON_DEVICE[@]}" --set train.max_steps="$STEPS" \
  --set train.checkpoint_every="$HALF" --set train.pipeline=true
resume() {
  has_step "$OUT/din" "$STEPS" || { echo "FAIL: no checkpoint step-$STEPS to resume from"; return 1; }
  "${TR[@]}" train "$DIN" --run-dir "$OUT/din" --resume "${ON_DEVICE[@]}" --set train.max_steps=$((STEPS + HALF)) \
    --set train.checkpoint_every="$HALF" && has_step "$OUT/din" $((STEPS + HALF))
}
check resume resume

# 4. HSTU retrieval with its full-corpus eval; fbgemm's jagged ops on GPU against CPU.
SHOW='valid ndcg' check hstu "${TR[@]}" train configs/ml100k_hstu.yaml --run-dir "$OUT/hstu" --set "sharding.device=$DEVICE" \
  --set "data.path=$DATA/sequences" --set train.max_steps="$HSTU_STEPS" --set train.epochs=$((HSTU_STEPS / 7 + 1)) \
  --set train.log_every=4
gpu_only jagged && check jagged "$PY" scripts/gpu_smoke.py jagged

# 5. The device's checkpoint evaluated and scored on CPU: same metrics, same scores.
cpu_eval() {
  CUDA_VISIBLE_DEVICES="" "${TR[@]}" eval "$DIN" --checkpoint "$OUT/din" --run-dir "$OUT/din_cpu_eval" "${ON_CPU[@]}" \
    && "$PY" scripts/gpu_smoke.py same "$OUT/din/metrics.json" "$(find "$OUT/din_cpu_eval" -name metrics.json | head -n1)" 1e-4
}
check eval-on-cpu cpu_eval
score() {  # OUT_NAME ARGS...
  local name=$1; shift
  "${TR[@]}" score "$DIN" --checkpoint "$OUT/din" --input "$DATA/ranking/test" --output "$OUT/$name" "$@"
}
check score score scores_device "${ON_DEVICE[@]}"
scored_on_cpu() { CUDA_VISIBLE_DEVICES="" score scores_cpu "${ON_CPU[@]}" \
  && "$PY" scripts/gpu_smoke.py scores "$OUT/scores_device" "$OUT/scores_cpu" 1e-4; }
check score-on-cpu scored_on_cpu
scored_sharded() { score scores_sharded --sharded "${ON_DEVICE[@]}" \
  && "$PY" scripts/gpu_smoke.py scores "$OUT/scores_device" "$OUT/scores_sharded" 1e-5; }
check score-sharded scored_sharded
SHOW='AUC' check score-int8 score scores_int8 --quantize int8 "${ON_DEVICE[@]}"

# 6. Host syncs of a few steps, and speed.
gpu_only sync-debug && check sync-debug "$PY" scripts/gpu_smoke.py sync "$DIN" "$OUT/sync" "$DATA/ranking"
for run in din_adam din; do
  if [ -f "$OUT/$run/throughput.json" ]; then
    result PASS "speed-din" "$run: $("$PY" -c "import json,sys; t=json.load(open(sys.argv[1])); \
print(f\"{t['samples_per_s']:.0f} samples/s over {t['steps']} steps\")" "$OUT/$run/throughput.json")"
    break
  fi
done
rate=$(grep -o '([0-9.]* steps/s)' "$OUT/hstu.log" | tail -n1 | tr -d '()' | cut -d' ' -f1)
if [ -z "$rate" ]; then result FAIL speed-hstu "no steps/s in $OUT/hstu.log"; else result PASS "speed-hstu" "$(awk -v r="$rate" 'BEGIN { printf "%.0f samples/s (%.2f steps/s x batch 128, as logged)", r * 128, r }')"; fi

echo "gpu_smoke: $FAILS failed (device $DEVICE, logs in $OUT)"
exit "$FAILS"
