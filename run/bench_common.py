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


def rss_mib(field: str = "RssAnon") -> float:
    """A /proc/self/status memory figure (RssAnon: copied memory; RssFile: mapped file pages)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class AnonPeak:
    """Samples RssAnon in a daemon thread: the peak of anonymous (non-file) memory, which
    ru_maxrss cannot separate from the memory-mapped weights."""

    def __init__(self, every_s: float = 0.05) -> None:
        import threading

        self.peak = rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.peak = max(self.peak, rss_mib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_mib())
