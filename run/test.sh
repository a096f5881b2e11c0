#!/usr/bin/env bash
# Quick start, command two: run the test suite (CPU only; spawns mpirun -np 2 and -np 4).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q tests "$@"
