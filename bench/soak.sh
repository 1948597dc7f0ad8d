#!/usr/bin/env bash
# Soak benchmark (issue 2/8, acceptance 4): `lab serve` on the embedded default model (CPU)
# under `lab loadtest` at 2x its saturation rate for 120 s, while bench/soak_clients.py holds
# 200 idle connections, 20 half-sent heads, 8 slow readers and a mid-stream leaver. Reports
# crashes, panics in the log, how every request was answered, max RSS, and whether the
# running count and KV blocks return to idle within 5 s of the load stopping.
#
#   bash bench/soak.sh                 # QPS=1.6 DURATION=120 (override by env)
#
# Figures go to $OUT (summary.txt, serve.log, loadtest/, clients.json, rss.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

LAB=${LAB:-target/release/lab}
OUT=${OUT:-bench/out/soak}
# 0.8 QPS is the default model's saturation step on the 2-core CPU (BENCHMARKS.md, "lab
# loadtest against a server no one here wrote"): twice it.
QPS=${QPS:-1.6}
DURATION=${DURATION:-120}
PORT=${PORT:-8190}
BASE=SmolLM2-135M-Instruct
ADAPTER=tests/fixtures/peft-smollm2/adapter

[ -x "$LAB" ] || cargo build --release
rm -rf "$OUT" && mkdir -p "$OUT"

# Bounded admission so the overload is shed (503 + Retry-After), not queued for minutes.
LAB_LOG=info RAYON_NUM_THREADS=2 "$LAB" serve --port "$PORT" --lora-modules "smol=$ADAPTER" \
  --max-num-seqs 16 --max-waiting 16 >"$OUT/serve.log" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 600); do
  grep -q "listening on" "$OUT/serve.log" && break
  kill -0 "$SERVER" 2>/dev/null || { echo "lab serve did not start:"; cat "$OUT/serve.log"; exit 1; }
  sleep 0.2
done
URL="http://127.0.0.1:$PORT"

metric() { curl -s "$URL/metrics" | awk -v m="$1" 'index($0, m"{") == 1 || index($0, m" ") == 1 {print $NF; exit}'; }

# RSS of the server once a second for the whole run (KiB).
( while kill -0 "$SERVER" 2>/dev/null; do
    awk '/^VmRSS:/ {print $2}' "/proc/$SERVER/status" 2>/dev/null || true
    sleep 1
  done ) >"$OUT/rss.txt" &
RSS_LOOP=$!

python3 bench/soak_clients.py --port "$PORT" --duration "$DURATION" --model "$BASE" --out "$OUT" &
CLIENTS=$!
T0=$(date +%s)
"$LAB" loadtest --url "$URL/v1" --qps "$QPS" --duration "$DURATION" --warmup 0 \
  --models "$BASE,smol" --prompts A,B,C --max-tokens 64 --timeout 300 --max-error-rate 1 \
  --out "$OUT/loadtest" >"$OUT/loadtest.txt" 2>&1 || echo "loadtest exited non-zero" >>"$OUT/loadtest.txt"
wait "$CLIENTS"
LOAD_END=$(date +%s.%N)

# Back to idle: nothing running or waiting, every KV block free.
IDLE_S=never
for _ in $(seq 100); do
  if [ "$(metric vllm:num_requests_running)" = 0 ] && [ "$(metric vllm:num_requests_waiting)" = 0 ] &&
    [ "$(metric lab_kv_free_blocks)" = "$(metric lab_kv_total_blocks)" ]; then
    IDLE_S=$(echo "$(date +%s.%N) - $LOAD_END" | bc)
    break
  fi
  sleep 0.1
done
AFTER=$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/chat/completions" -H 'content-type: application/json' \
  -d "{\"model\": \"$BASE\", \"messages\": [{\"role\": \"user\", \"content\": \"Still there?\"}], \"max_tokens\": 8}")
HEALTH=$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")
ALIVE=yes; kill -0 "$SERVER" 2>/dev/null || ALIVE=no
kill "$RSS_LOOP" 2>/dev/null || true
kill -TERM "$SERVER"; wait "$SERVER" && EXIT=0 || EXIT=$?
trap - EXIT

python3 - "$OUT" "$IDLE_S" "$AFTER" "$HEALTH" "$ALIVE" "$EXIT" "$(( $(date +%s) - T0 ))" <<'EOF' | tee "$OUT/summary.txt"
import collections, json, sys
out, idle, after, health, alive, code, wall = sys.argv[1:]
res = json.load(open(f"{out}/loadtest/results.json"))
kinds = collections.Counter("ok" if r["ok"] else r["error"] for r in res["requests"])
step = res["steps"][0]
log = open(f"{out}/serve.log").read()
rss = [int(x) for x in open(f"{out}/rss.txt").read().split()]
clients = json.load(open(f"{out}/clients.json"))
print(f"soak: {len(res['requests'])} loadtest requests offered at {step['offered_qps']} QPS, wall {wall} s")
print(f"  answers: {dict(kinds)}  (ok = streamed to finish_reason and [DONE])")
e2e = step["e2e"] or {"p50_ms": 0, "p99_ms": 0}
print(f"  achieved {step['achieved_qps']:.2f} QPS, {step['completed']} completed, E2E p50/p99 "
      f"{e2e['p50_ms']:.0f}/{e2e['p99_ms']:.0f} ms, {step['output_tokens_per_s']:.1f} out tok/s")
print(f"  side clients: {json.dumps(clients)}")
print(f"  server alive after the load: {alive}; /health {health}; a new request after: HTTP {after}")
print(f"  back to idle (0 running, 0 waiting, all KV blocks free) {idle} s after the load stopped")
print(f"  RSS max {max(rss) / 1024:.0f} MiB (first sample {rss[0] / 1024:.0f} MiB, last {rss[-1] / 1024:.0f} MiB)")
print(f"  panics in the log: {log.count('panicked')}; 'connection cap reached' lines: {log.count('connection cap reached')}")
print(f"  exit code after SIGTERM: {code}")
EOF
