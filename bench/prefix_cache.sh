#!/usr/bin/env bash
# Prefix cache on vs off (CPU, the embedded default model): the same open-loop traffic over the
# three domains' eval prompts (each starts with its domain's long system message), TTFT and
# throughput from `lab loadtest`, hit rate from /metrics. Results under ${OUT:-bench/out/prefix}.
#   bash bench/prefix_cache.sh [QPS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
QPS=${1:-1}
DUR=${2:-60}
OUT=${OUT:-bench/out/prefix}
LAB=${LAB:-target/release/lab}
PORT=18081
mkdir -p "$OUT"
run() { # $1 = on|off
  local mode=$1 flags=()
  [[ $mode == off ]] && flags=(--no-enable-prefix-caching)
  $LAB serve --port $PORT --served-model-name base --max-loras 1 "${flags[@]}" > "$OUT/serve-$mode.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do grep -q "listening on" "$OUT/serve-$mode.log" && break; sleep 1; done
  $LAB loadtest --url http://127.0.0.1:$PORT --models base --prompts A,B,C --qps "$QPS" --duration "$DUR" \
    --warmup 5 --max-tokens 32 --out "$OUT/$mode" | tee "$OUT/loadtest-$mode.txt"
  curl -s http://127.0.0.1:$PORT/metrics | grep -E '^vllm:prefix_cache_(queries|hits)_total' | tee "$OUT/metrics-$mode.txt"
  kill -TERM $pid; wait $pid || true
}
run off
run on
