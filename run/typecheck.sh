#!/usr/bin/env bash
# Type-check the package with mypy (settings in pyproject.toml [tool.mypy]).
# setup.py maps llama_mpi.<folder> to the top-level folders; mypy has no such mapping, so this
# links them under build/typecheck/llama_mpi/ (mypy_path) and checks `llama_mpi` from there.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/llama_mpi
rm -rf "$tree"
mkdir -p "$tree"
ln -s ../../../llama_mpi/__init__.py "$tree/__init__.py"
for sub in models moe parallel mpi_server; do
    ln -s "../../../$sub" "$tree/$sub"
done
exec .venv/bin/mypy "$@"
