#!/usr/bin/env bash
# Fair share vs FCFS (CPU, the embedded default model): 4 quiet tenants (q1..q4) at a steady
# rate and one noisy tenant at 10x each quiet one's rate, all on the same adapter files under
# five names (tenant = adapter name). Three runs of `lab loadtest`: the quiet tenants alone
# (their baseline), then all five under --scheduling-policy fcfs, then under fair. Results
# under ${OUT:-bench/out/fairness}.
#   bash bench/fairness.sh ADAPTER_DIR [QUIET_QPS_EACH] [SECONDS]
# SERVE_FLAGS adds serve flags (e.g. "--max-num-seqs 8": a bounded running set, so a queue
# forms under overload and the admission order decides who runs). CAP=N adds a run: fair with
# --max-running-per-tenant N (headroom the quiet tenants find free on arrival). PREEMPT=1 adds
# a run: fair with --fair-preemption.
set -euo pipefail
cd "$(dirname "$0")/.."
ADAPTER=${1:?usage: bash bench/fairness.sh ADAPTER_DIR [QUIET_QPS_EACH] [SECONDS]}
Q=${2:-0.15}
DUR=${3:-60}
OUT=${OUT:-bench/out/fairness}
LAB=${LAB:-target/release/lab}
PORT=18082
mkdir -p "$OUT"
MODS=()
for t in q1 q2 q3 q4 noisy; do MODS+=("$t=$ADAPTER"); done
run() { # $1 = name, $2 = policy, $3 = models, $4 = qps, rest = loadtest flags
  local name=$1 policy=$2 models=$3 qps=$4; shift 4
  # shellcheck disable=SC2086
  $LAB serve --port $PORT --scheduling-policy "$policy" --max-loras 8 ${SERVE_FLAGS:-} ${RUN_FLAGS:-} --lora-modules "${MODS[@]}" \
    > "$OUT/serve-$name.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 120); do grep -q "listening on" "$OUT/serve-$name.log" && break; sleep 1; done
  $LAB loadtest --url http://127.0.0.1:$PORT --models "$models" --prompts A --qps "$qps" --duration "$DUR" \
    --warmup 5 --max-tokens 32 --out "$OUT/$name" "$@" | tee "$OUT/loadtest-$name.txt"
  kill -TERM $pid; wait $pid || true
}
quiet=$(python3 -c "print(round(4 * $Q, 4))")
all=$(python3 -c "print(round(14 * $Q, 4))")
run quiet-alone fcfs q1,q2,q3,q4 "$quiet" --mix uniform
run fcfs fcfs q1,q2,q3,q4,noisy "$all" --mix weights:noisy=10
run fair fair q1,q2,q3,q4,noisy "$all" --mix weights:noisy=10
if [[ ${PREEMPT:-0} == 1 ]]; then
  RUN_FLAGS="--fair-preemption" run fair-preempt fair q1,q2,q3,q4,noisy "$all" --mix weights:noisy=10
fi
if [[ -n ${CAP:-} ]]; then
  RUN_FLAGS="--max-running-per-tenant $CAP" run "fair-cap$CAP" fair q1,q2,q3,q4,noisy "$all" --mix weights:noisy=10
fi
