"""The project's C kernels for CPUs with AVX512-BF16, compiled on first use.

The sources next to this file (``bf16_gemv.c``: skinny bf16 matmuls for decode;
``moe_combine.c``: the weighted scatter-add that sums routed-expert outputs;
``mla_attention.c``: absorbed MLA attention over the paged latent pool; ``rms_norm.c``;
``swiglu.c``: the SwiGLU activation) are compiled by
the system C compiler into one shared library under ``~/.cache/llama-mpi/kernels`` (named by
a hash of the sources and flags, written atomically: ranks may race here), loaded with ctypes
and run on torch's own OpenMP threads. Without a compiler, without AVX512-BF16, or with
``LLAMA_MPI_NO_KERNELS=1``, ``kernel()`` is None and every caller uses plain torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(n) for n in ("bf16_gemv.c", "moe_combine.c",
                                                 "mla_attention.c", "rms_norm.c",
                                                 "swiglu.c")]
CACHE = Path(os.environ.get("LLAMA_MPI_KERNEL_CACHE", "~/.cache/llama-mpi/kernels")).expanduser()
HEADERS = [Path(__file__).with_name("kernel_util.h")]  # included by the sources
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
_RETURNS_INT = {"mla_attention_bf16"}  # 0 or an error code; every other kernel returns void
_SIGNATURES = {  # name: argument types (the last int is the thread count)
    "skinny_bf16_matmul": [_P] * 3 + [_I] * 3 + [ctypes.c_int],
    "grouped_bf16_matmul": [_P] * 5 + [_I] * 3 + [ctypes.c_int],
    "batched_skinny_bf16_matmul": [_P] * 3 + [_I] * 4 + [ctypes.c_int],
    "weighted_scatter_add_bf16": [_P] * 4 + [_I] * 2 + [ctypes.c_int],
    "mla_attention_bf16": [_P] * 6 + [_I] * 4 + [ctypes.c_float, ctypes.c_int],
    "rms_norm_bf16": [_P, ctypes.c_int, _I, _P, _P, _I, _I, ctypes.c_float, ctypes.c_int],
    "silu_mul_bf16": [_P, _P, _I, _I, ctypes.c_int],
}


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LLAMA_MPI_NO_KERNELS") or not _cpu_has_avx512_bf16():
        return None
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: decode matmuls use torch")
        return None
    digest = hashlib.sha256(" ".join(_FLAGS).encode())
    for src in SOURCES + HEADERS:
        digest.update(src.read_bytes())
    lib = CACHE / f"llama_mpi_kernels-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            out = Path(tmp) / lib.name
            proc = subprocess.run([cc, *_FLAGS, *map(str, SOURCES), "-o", str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("C kernels did not compile; using torch:\n%s", proc.stderr[-2000:])
                return None
            os.replace(out, lib)
    handle = ctypes.CDLL(str(lib))
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(handle, name)
        fn.restype = ctypes.c_int if name in _RETURNS_INT else None
        fn.argtypes = argtypes
    return handle


_LIB: ctypes.CDLL | None = None
_LOADED = False


def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, or None where it cannot be built here."""
    global _LIB, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            _LIB = _build()
        except OSError as e:  # a broken cache entry or loader problem: never fatal
            log.warning("C kernels unavailable (%s); using torch", e)
            _LIB = None
    return _LIB
