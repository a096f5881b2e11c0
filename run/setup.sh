#!/usr/bin/env bash
# Create .venv and install llama-mpi with its MPI launcher and test tools.
# torch is pinned first: an unpinned torch would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[mpi,test]"
