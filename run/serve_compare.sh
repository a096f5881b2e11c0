#!/usr/bin/env bash
# Serving side by side: llama-mpi's llama-server and llama.cpp's llama-server on one GGUF,
# one after the other (never at once), each driven by run/bench_serving.py.
#
#   run/serve_compare.sh GGUF [--clients 8] [--slots 8] [--prompt-len 230] [--gen-len 64]
#                             [--rounds 2] [--limit 21G] [--bias-ids 1000,1001,...]
#
# Env: LCPP_SERVER (default: llama.cpp's build under /tmp/lcpp), OUT (default
# /tmp/bench/serve-<time>), EXTRA_LCPP (more llama.cpp flags). --limit runs each server in a
# real cgroup memory limit (run/in_cgroup.py). llama.cpp infers "no q LoRA" from the layer
# count (26/27), so other layer counts get --override-kv deepseek2.attention.q_lora_rank=int:0.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { sed -n 2,11p "$0"; exit 2; }
MODEL="$1"; shift
CLIENTS=8; SLOTS=8; PLEN=230; GLEN=64; ROUNDS=2; LIMIT=""; BIAS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --clients) CLIENTS="$2"; shift 2;; --slots) SLOTS="$2"; shift 2;;
    --prompt-len) PLEN="$2"; shift 2;; --gen-len) GLEN="$2"; shift 2;;
    --rounds) ROUNDS="$2"; shift 2;; --limit) LIMIT="$2"; shift 2;;
    --bias-ids) BIAS="$2"; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
LCPP_SERVER="${LCPP_SERVER:-/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server}"
OUT="${OUT:-/tmp/bench/serve-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
PY="$ROOT/.venv/bin/python"
CTX=$((SLOTS * 2048))
LAYERS=$("$PY" -c "import sys; from llama_mpi.models.gguf.gguf_file import read_metadata as r; \
print(r(sys.argv[1])['deepseek2.block_count'])" "$MODEL")
QLORA=()
[ "$LAYERS" = 26 ] || [ "$LAYERS" = 27 ] || \
  QLORA=(--override-kv deepseek2.attention.q_lora_rank=int:0)
wrap() { if [ -n "$LIMIT" ]; then "$PY" "$ROOT/run/in_cgroup.py" --limit "$LIMIT" -- "$@"; \
         else "$@"; fi; }

serve_and_bench() {  # name port cmd...
  local name="$1" port="$2"; shift 2
  wrap "$@" --port "$port" > "$OUT/$name-server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { echo "$name server died:"; tail -20 "$OUT/$name-server.log"; return 1; }
    sleep 1
  done
  echo "== $name: uptime before: $(uptime)"
  "$PY" "$ROOT/run/bench_serving.py" --url "http://127.0.0.1:$port/v1/completions" \
    --prompt-len "$PLEN" --gen-len "$GLEN" --id-hi 100000 --concurrency "$CLIENTS" \
    --rounds "$ROUNDS" ${BIAS:+--logit-bias-ids "$BIAS"} --label "$name" \
    --json "$OUT/$name.json" | tail -5
  echo "== $name: uptime after: $(uptime)"
  # SIGTERM to the server itself (in_cgroup's child), then wait for the wrapper
  pkill -TERM -f -- "--port $port" || true
  wait "$pid" || true
  grep -h "in_cgroup:" "$OUT/$name-server.log" || true
}

serve_and_bench llama-mpi 18080 "$ROOT/.venv/bin/llama-server" -m "$MODEL" -t 2 -tb 2 \
  -np "$SLOTS" -c "$CTX"
serve_and_bench llama.cpp 18081 "$LCPP_SERVER" -m "$MODEL" -t 2 -tb 2 -np "$SLOTS" -c "$CTX" \
  ${QLORA[@]+"${QLORA[@]}"} ${EXTRA_LCPP:-}
echo "results in $OUT"
