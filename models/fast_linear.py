"""``linear(x, w)``: F.linear, except for decode-shaped bf16 products on CPUs with AVX512-BF16.

Decode multiplies one to a few activation rows by every weight of the model, so tokens per
second are set by how fast weights stream from memory. ``bf16_gemv.c`` (compiled on first
use with the system C compiler into ``~/.cache/llama-mpi/kernels``, loaded with ctypes, and
run on torch's own OpenMP threads) reads weights ~1.4x faster than torch's CPU path here.
Without a compiler, without AVX512-BF16, or with ``LLAMA_MPI_NO_KERNELS=1``, every call
is plain ``F.linear``.
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

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bf16_gemv.c")
CACHE = Path(os.environ.get("LLAMA_MPI_KERNEL_CACHE", "~/.cache/llama-mpi/kernels")).expanduser()
MAX_ROWS = 16  # the kernel's limit; it outpaces torch at every row count up to here (measured)
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


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
    src = SOURCE.read_bytes()
    tag = hashlib.sha256(src + " ".join(_FLAGS).encode()).hexdigest()[:16]
    lib = CACHE / f"bf16_gemv-{tag}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:  # atomic: ranks may race here
            out = Path(tmp) / lib.name
            proc = subprocess.run([cc, *_FLAGS, str(SOURCE), "-o", str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("bf16 kernel did not compile; using torch:\n%s", proc.stderr[-2000:])
                return None
            os.replace(out, lib)
    handle = ctypes.CDLL(str(lib))
    handle.skinny_bf16_matmul.restype = None
    handle.skinny_bf16_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3 + [
        ctypes.c_int]
    handle.grouped_bf16_matmul.restype = None
    handle.grouped_bf16_matmul.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [
        ctypes.c_int]
    handle.batched_skinny_bf16_matmul.restype = None
    handle.batched_skinny_bf16_matmul.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [
        ctypes.c_int]
    return handle


_LIB: ctypes.CDLL | None = None
_LOADED = False


def kernel() -> ctypes.CDLL | None:
    global _LIB, _LOADED
    if not _LOADED:
        _LOADED = True
        try:
            _LIB = _build()
        except OSError as e:  # a broken cache entry or loader problem: never fatal
            log.warning("bf16 kernel unavailable (%s); using torch", e)
            _LIB = None
    return _LIB


def _use_kernel(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    return (w.dtype is torch.bfloat16 and x.dtype is torch.bfloat16 and x.device.type == "cpu"
            and 0 < rows <= MAX_ROWS and w.is_contiguous() and kernel() is not None)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T`` for ``x`` [..., K] and ``w`` [N, K]."""
    if x.dim() == 2 and _use_kernel(x, w, x.shape[0]):
        x = x.contiguous()
        m, (n, k) = x.shape[0], w.shape
        y = torch.empty(m, n, dtype=torch.bfloat16)
        _LIB.skinny_bf16_matmul(w.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k,
                                torch.get_num_threads())
        return y
    return F.linear(x, w)


def batched_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x[b] @ w[b].T`` for ``x`` [B, M, K] and ``w`` [B, N, K] (e.g. per attention head)."""
    if x.dim() == 3 and _use_kernel(x, w, x.shape[1]):
        x = x.contiguous()
        (b, m, _), n, k = x.shape, w.shape[1], w.shape[2]
        y = torch.empty(b, m, n, dtype=torch.bfloat16)
        _LIB.batched_skinny_bf16_matmul(w.data_ptr(), x.data_ptr(), y.data_ptr(), b, m, n, k,
                                        torch.get_num_threads())
        return y
    return torch.bmm(x, w.transpose(1, 2))


def grouped_matmul(x: torch.Tensor, w: torch.Tensor, idx: list[int], counts: list[int]
                   ) -> torch.Tensor | None:
    """Rows of ``x`` [R, K] in consecutive groups of ``counts[g]`` rows, group g times
    ``w[idx[g]].T`` for a stacked ``w`` [E, N, K]: a decode batch's routed experts in one call.
    None where the kernel cannot take it (unavailable, or a group over MAX_ROWS rows)."""
    if not (x.dim() == 2 and w.dim() == 3 and max(counts, default=0) <= MAX_ROWS
            and _use_kernel(x, w, 1)):
        return None
    x = x.contiguous()
    ids = torch.tensor(idx, dtype=torch.int64)
    starts = torch.zeros(len(counts) + 1, dtype=torch.int64)
    starts[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    y = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16)
    _LIB.grouped_bf16_matmul(w.data_ptr(), ids.data_ptr(), starts.data_ptr(), x.data_ptr(),
                             y.data_ptr(), len(counts), w.shape[1], w.shape[2],
                             torch.get_num_threads())
    return y
