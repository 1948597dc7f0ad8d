#!/usr/bin/env bash
# Issue 6/8, the seed's table on the H200: `lab serve --device cuda` on synthetic:llama-3.1-8b
# (seeded random weights: honest for timing, never for quality) with 50 rank-16 customer
# adapters (PEFT files, random values), and `lab loadtest` climbing the QPS ladder until it
# saturates: 256-token prompts, 128 output tokens (ignore_eos), uniform over the 50.
#
#   bash bench/gpu-serve.sh [table|resident|zipf|all ...]     (carry: scratch/gpu)
#
# table    = 50 customers on 8 slots (--max-loras 8 --max-cpu-loras 32 --max-lora-rank 64)
# zipf     = the same server, a zipf:1.1 mix over the 50 (run right after `table`)
# resident = all 50 resident (--max-loras 50): the no-cliff baseline
# Env: QPS (the all-resident ladder), QPS_SLOTS8 (the 8-slot one), DURATION / WARMUP (s per step), MAX_BATCHED (--max-num-batched-tokens),
# SELFTEST=1 (lab selftest first), BENCH=1 (then lab bench's adapter decode points).
# Everything lands in $OUT and comes back as $OUT/all.tgz too.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu-serve}
mkdir -p "$OUT"
export LD_LIBRARY_PATH="$(ls -d /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib | head -1)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONUNBUFFERED=1
LAB=/tmp/lab-gpu/lab
mkdir -p /tmp/lab-gpu
[[ -x $LAB ]] || xz -dc -T0 scratch/gpu/lab.xz > $LAB && chmod +x $LAB
export LAB_HOME=/tmp/lab-gpu/home
MODEL=synthetic:llama-3.1-8b
QPS=${QPS:-1,5,7,10,20,30,40,60,80,100}
# The 8-slot ladder saturates early (50 customers on 8 slots: see BENCHMARKS.md); finer steps.
QPS_SLOTS8=${QPS_SLOTS8:-1,3,5,7,10,15}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-5}
# Tokens per step (prefill chunks + decode rows); vLLM's V1 API server uses 2048-8192.
MAX_BATCHED=${MAX_BATCHED:-2048}
CUSTOMERS=/tmp/lab-gpu/customers
PORT=18090
log() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$OUT/log.txt"; }
finish() { tar czf /tmp/lab-gpu/all.tgz -C "$OUT" . && mv /tmp/lab-gpu/all.tgz "$OUT/all.tgz"; }
trap finish EXIT

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv; echo "lab commit: $(cat scratch/gpu/COMMIT 2>/dev/null)"; } > "$OUT/machine.txt"

if [[ ${SELFTEST:-0} == 1 ]]; then
  log "lab selftest --device cuda"
  $LAB selftest --device cuda > "$OUT/selftest.txt" 2>&1
  rc=$?
  echo "rc=$rc" >> "$OUT/selftest.txt"
  tail -3 "$OUT/selftest.txt"
  # Timing code that is not correct measures nothing.
  if [[ $rc != 0 ]]; then grep '^FAIL' "$OUT/selftest.txt"; log "selftest failed: no benchmarks"; exit 1; fi
fi

if [[ ${BENCH:-0} == 1 ]]; then
  # The decode step with 0/1/8/32 distinct adapters (issue 4/8's points), as bench/gpu.sh lora.
  log "lab bench lora"
  $LAB bench --device cuda --model $MODEL --floor --json-out "$OUT/bench-lora.jsonl" --batch 1,32 --adapters 0,1,8,32 \
    --prompt-len 512 --decode-steps 32 --repeats 5 > "$OUT/bench-lora.md" 2> "$OUT/bench-lora.err"
  echo "rc=$?" >> "$OUT/bench-lora.err"
  cat "$OUT/bench-lora.md"
fi

if [[ ! -f $CUSTOMERS/customer-50/adapter_model.safetensors ]]; then
  log "50 rank-16 customer adapters (PEFT, random values, all seven projections)"
  /opt/torch/.venv/bin/python3 bench/make_peft_adapter.py --many $CUSTOMERS 16 50 > "$OUT/adapters.txt" 2>&1
  tail -1 "$OUT/adapters.txt"
fi

SERVE=
start_server() { # $1 = name, $2 = --max-loras
  log "lab serve --device cuda ($1: --max-loras $2)"
  $LAB serve --device cuda --model $MODEL --port $PORT --max-loras "$2" --max-cpu-loras 32 --max-lora-rank 64 \
    --lora-dir $CUSTOMERS --max-waiting 4096 --max-num-batched-tokens "$MAX_BATCHED" --max-model-len 8192 > "$OUT/serve-$1.txt" 2>&1 &
  SERVE=$!
  for _ in $(seq 1 400); do
    grep -q "listening on" "$OUT/serve-$1.txt" && break
    kill -0 $SERVE 2>/dev/null || { log "lab serve exited"; tail -5 "$OUT/serve-$1.txt"; return 1; }
    sleep 0.5
  done
  grep -E "gpu-memory-utilization|KV cache|captured|warmed" "$OUT/serve-$1.txt"
}
stop_server() { # $1 = name
  curl -s -m 10 http://127.0.0.1:$PORT/metrics > "$OUT/metrics-$1.txt"
  grep -E '^lab_engine_step_seconds_(sum|count)|^lab_engine_busy_seconds_total|^lab_adapter_(loads|evictions)_total|^vllm:num_preemptions_total|^lab_decode_graph_replays_total' "$OUT/metrics-$1.txt"
  kill -TERM $SERVE; wait $SERVE
  echo "serve exit code: $?" >> "$OUT/serve-$1.txt"
}
load() { # $1 = name, $2 = mix, $3 = QPS ladder, rest = extra flags
  local name=$1 mix=$2 qps=$3; shift 3
  log "lab loadtest $name (--mix $mix, --qps $qps)"
  $LAB loadtest --url http://127.0.0.1:$PORT --qps "$qps" --until-saturated --models 'customer-{01..50}' --mix "$mix" \
    --input-len 256 --output-len 128 --duration "$DURATION" --warmup "$WARMUP" --timeout 120 --max-error-rate 1 \
    --out "$OUT/load-$name" "$@" > "$OUT/load-$name.md" 2> "$OUT/load-$name.err"
  echo "rc=$?" >> "$OUT/load-$name.err"
  grep -vE "^\s*[0-9.]+ customer-" "$OUT/load-$name.md" | head -30
}

MODES=${*:-table}
for mode in $MODES; do
  case $mode in
    table)
      start_server slots8 8 && { load table uniform "$QPS_SLOTS8"; [[ $MODES == *zipf* ]] && load zipf zipf:1.1 "$QPS_SLOTS8"; stop_server slots8; } ;;
    resident)
      start_server resident50 50 && { load resident uniform "$QPS"; stop_server resident50; } ;;
    zipf) [[ $MODES == *table* ]] || { start_server slots8 8 && { load zipf zipf:1.1 "$QPS_SLOTS8"; stop_server slots8; }; } ;;
  esac
done
log "done"
