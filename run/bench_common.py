"""Stdlib-only helpers shared by the benchmark scripts (bench_llamacpp.py runs in llama.cpp's
own venv, where neither torch nor llama_mpi is installed)."""

from __future__ import annotations

import os
import statistics
import subprocess


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def uptime_line() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def summarize(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0}
