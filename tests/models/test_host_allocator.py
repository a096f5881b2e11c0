"""The host-allocator tuning: applied once on glibc, left alone when the user tuned malloc."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

CODE = "from llama_mpi.models.host_allocator import keep_freed_memory as k; print(k(), k())"


def run(env_extra: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True,
                          text=True, check=True).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_thresholds_are_set_once_on_glibc():
    assert run({}) == "True True"


def test_user_malloc_settings_are_respected():
    assert run({"MALLOC_ARENA_MAX": "2"}) == "False False"
