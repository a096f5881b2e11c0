"""The project's C kernels for CPUs with AVX512-BF16, compiled on first use.

The sources next to this file (``bf16_gemv.c``: skinny bf16 matmuls for decode;
``moe_combine.c``: the weighted scatter-add that sums routed-expert outputs;
``mla_attention.c``: absorbed MLA attention over the paged latent pool; ``rms_norm.c``;
``swiglu.c``: the SwiGLU activation; ``quant_matmul.c``: products straight from quantized
GGUF blocks, with AVX512-VNNI, over ``quant_blocks.h`` (block unpacking) and ``quant_acts.h``
(activation layout); ``quant_rows.c``: activation quantization and row dequantization;
``decode_fused.c``: a whole decode layer in one call, built on the others, with its private
``decode_fused_*.h`` parts) are compiled by the system C compiler
into one shared library under ``~/.cache/llama-mpi/kernels`` (named by a hash of the sources
and flags, written atomically: ranks may race here), loaded with ctypes and run on torch's own
OpenMP threads. Without a compiler, without AVX512-BF16 and AVX512-VNNI, or with
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
                                                 "swiglu.c", "quant_matmul.c",
                                                 "quant_rows.c", "decode_fused.c")]
CACHE = Path(os.environ.get("LLAMA_MPI_KERNEL_CACHE", "~/.cache/llama-mpi/kernels")).expanduser()
HEADERS = [Path(__file__).with_name(n)  # included by the sources
           for n in ("kernel_util.h", "quant_blocks.h", "quant_acts.h", "decode_fused_types.h",
                     "decode_fused_ops.h", "decode_fused_attention.h")]
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mf16c",
          "-fopenmp", "-shared", "-fPIC"]
_P, _I = ctypes.c_void_p, ctypes.c_int64
# 0 or an error code; every other kernel returns void
_RETURNS_INT = {"mla_attention_bf16", "quantize_rows_q8", "quant_matmul", "grouped_quant_matmul",
                "quant_dequant_rows", "fused_decode_layer", "fused_decode_head"}
_C = ctypes.c_int
_SIGNATURES = {  # name: argument types (the last int is the thread count)
    "skinny_bf16_matmul": [_P] * 3 + [_I] * 3 + [ctypes.c_int],
    "grouped_bf16_matmul": [_P] * 5 + [_I] * 3 + [ctypes.c_int],
    "batched_skinny_bf16_matmul": [_P] * 3 + [_I] * 4 + [ctypes.c_int],
    "weighted_scatter_add_bf16": [_P] * 4 + [_I] * 2 + [ctypes.c_int],
    "mla_attention_bf16": [_P] * 6 + [_I] * 4 + [ctypes.c_float, ctypes.c_int],
    "rms_norm_bf16": [_P, ctypes.c_int, _I, _P, _P, _I, _I, ctypes.c_float, ctypes.c_int],
    "silu_mul_bf16": [_P, _P, _I, _I, ctypes.c_int],
    # (X, x_is_bf16, ldx, M, K, xq, xd, xsum, nthreads)
    "quantize_rows_q8": [_P, _C, _I, _I, _I, _P, _P, _P, _C],
    # (qtype, W, row_bytes, xq, xd, xsum, Y, ldy, y_is_bf16, M, N, K, nthreads)
    "quant_matmul": [_C, _P, _I, _P, _P, _P, _P, _I, _C, _I, _I, _I, _C],
    # (qtype, W, expert_bytes, row_bytes, idx, start, G, xq, xd, xsum, Y, ldy, y_is_bf16, N, K,
    #  nthreads)
    "grouped_quant_matmul": [_C, _P, _I, _I, _P, _P, _I, _P, _P, _P, _P, _I, _C, _I, _I, _C],
    # (qtype, W, row_bytes, rows or NULL, nrows, K, out, out_is_bf16, nthreads)
    "quant_dequant_rows": [_C, _P, _I, _P, _I, _I, _P, _C, _C],
    # (layer, step, x, out, pool, mode): one decode layer (decode_fused.c, fused_decode.py)
    "fused_decode_layer": [_P] * 5 + [_I],
    "fused_decode_profile": [ctypes.c_int, _P],  # (on, stats out or NULL)
    "fused_decode_head": [_P] * 3 + [_I, _P, _I],  # (head, x, rows, R, logits, nthreads)
}


def _cpu_has_avx512_bf16_vnni() -> bool:
    """AVX512-BF16 and AVX512-VNNI: every CPU with the first has the second so far; the
    quantized-weight kernels need VNNI."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags and "avx512_vnni" in flags


def _build() -> ctypes.CDLL | None:
    if os.environ.get("LLAMA_MPI_NO_KERNELS") or not _cpu_has_avx512_bf16_vnni():
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


def require_kernel() -> ctypes.CDLL:
    """The kernel library, for a caller that has already seen ``kernel()`` is not None."""
    lib = kernel()
    if lib is None:
        raise RuntimeError("C kernels are unavailable here; check kernel() before calling")
    return lib
