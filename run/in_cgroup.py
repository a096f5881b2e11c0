#!/usr/bin/env python3
"""Run a command under a real cgroup memory limit (root; cgroup v1 or v2), then report.

    .venv/bin/python run/in_cgroup.py --limit 21G -- .venv/bin/python run/bench.py -m X.gguf

The limit counts the page cache the command faults in, as on a memory-limited host or
container. Prints the cgroup's peak usage and OOM kills after the command; exits with its code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llama_mpi.models.memory_budget import parse_size  # noqa: E402
from tests.cgroup_util import run_with_memory_limit  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", required=True, help="bytes, or with a suffix: 21G, 512M")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        ap.error("no command given")
    proc, note = run_with_memory_limit(cmd, parse_size(args.limit))
    if proc is None:
        print(f"in_cgroup: no cgroup could be made: {note}", file=sys.stderr)
        return 2
    print(f"in_cgroup: {note}; exit {proc.returncode}", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
