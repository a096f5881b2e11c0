#!/usr/bin/env bash
# Quick start, command one: set everything up, then serve the built-in model on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh
exec .venv/bin/llama-server --config configs/default.yaml "$@"
