#!/usr/bin/env bash
# Side-by-side pp/tg of llama-mpi (run/bench.py) and llama.cpp (run/bench_llamacpp.py) on one GGUF.
#
#   run/compare.sh GGUF [-p 512] [-n 128] [-r 3] [-t 2] [--mpi N --moe-comm alltoall|allreduce]
#
# Env: LCPP_PY (default /tmp/lcpp-venv/bin/python: a venv with llama-cpp-python),
#      OUT (default /tmp/bench/compare-<time>), OURS_JSON (reuse this run/bench.py result
#      instead of running llama-mpi again), LCPP_JSON (likewise for llama.cpp).
# The two run one after the other, never at once; the machine's load average is recorded before/after every test in both JSONs.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[ $# -ge 1 ] || { sed -n 2,9p "$0"; exit 2; }
MODEL="$1"; shift
P=512; N=128; R=3; T=2; EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    -p) P="$2"; shift 2;; -n) N="$2"; shift 2;; -r) R="$2"; shift 2;; -t) T="$2"; shift 2;;
    *) EXTRA+=("$1"); shift;;
  esac
done
LCPP_PY="${LCPP_PY:-/tmp/lcpp-venv/bin/python}"
OUT="${OUT:-/tmp/bench/compare-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
echo "== uptime before: $(uptime)"
echo "== llama-mpi"
if [ -n "${OURS_JSON:-}" ]; then
  cp "$OURS_JSON" "$OUT/llama-mpi.json"; echo "(reused $OURS_JSON)"
else
  "$ROOT/.venv/bin/python" "$ROOT/run/bench.py" --model "$MODEL" -p "$P" -n "$N" -r "$R" -t "$T" \
    --no-progress --json "$OUT/llama-mpi.json" ${EXTRA[@]+"${EXTRA[@]}"}
fi
echo "== llama.cpp ($LCPP_PY)"
if [ -n "${LCPP_JSON:-}" ]; then
  cp "$LCPP_JSON" "$OUT/llama-cpp.json"; echo "(reused $LCPP_JSON)"
elif "$LCPP_PY" -c "import llama_cpp" 2>/dev/null; then
  "$LCPP_PY" "$ROOT/run/bench_llamacpp.py" --model "$MODEL" -p "$P" -n "$N" -r "$R" -t "$T" \
    --no-progress --json "$OUT/llama-cpp.json"
else
  echo "llama-cpp-python is not importable with $LCPP_PY: skipping llama.cpp" >&2
fi
echo "== uptime after: $(uptime)"
"$ROOT/.venv/bin/python" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
ours = json.loads((out / "llama-mpi.json").read_text())
theirs_p = out / "llama-cpp.json"
theirs = json.loads(theirs_p.read_text()) if theirs_p.exists() else None
def med(res):
    return {t["test"]: t["tokens_per_s"]["median"] for t in res["tests"]}
o = med(ours); c = med(theirs) if theirs else {}
backend = ours["mode"] + (f" x{ours['ranks']} {ours['moe_comm']}" if ours["ranks"] > 1 else "")
print(f"\n| test | llama-mpi ({backend}) t/s | llama.cpp t/s | llama-mpi / llama.cpp |")
print("|---|---|---|---|")
for test, v in o.items():
    w = c.get(test)
    print(f"| {test} | {v:.2f} | {w:.2f} | {v / w:.3f} |" if w else f"| {test} | {v:.2f} | - | - |")
print(f"| load s | {ours['load_s']:.2f} | " + (f"{theirs['load_s']:.2f} |" if theirs else "- |")
      + " |")
print(f"| peak RSS MiB | {ours['peak_rss_mib']:.0f} | "
      + (f"{theirs['peak_rss_mib']:.0f} |" if theirs else "- |") + " |")
summary = {"llama_mpi": o, "llama_cpp": c,
           "ratio": {k: o[k] / c[k] for k in o if c.get(k)}, "dir": str(out)}
(out / "compare.json").write_text(json.dumps(summary, indent=2))
print(f"\nwrote {out / 'compare.json'}")
PY
