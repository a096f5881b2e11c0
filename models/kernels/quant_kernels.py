"""Torch wrappers of ``quant_matmul.c``: products and row dequantization straight from the raw
bytes of quantized GGUF tensors (Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) on CPUs with
AVX512-VNNI.

A quantized weight is a uint8 tensor ``[N, row_bytes]`` (``[E, N, row_bytes]`` for stacked
experts) holding K/block blocks per row, exactly as in the file; rows may be further apart
than their packed size (``stride(0)`` bytes: a block-aligned column slice of a wider
tensor), but each row's bytes must be contiguous. Activations are quantized once to int8 per
32 values (``quantize_activations``) and can be reused for every weight that multiplies the
same rows; the products use integer dot products and float32 sums, so their only error beyond
float32 rounding is that 8-bit activation quantization. This module knows nothing about the
model: callers pick the tensors and fall back to torch where ``available()`` is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from llama_mpi.models.kernels.cpu_kernels import kernel

QT = GGMLQuantizationType
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(
    {QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K})
MAX_ROWS = 16  # activation rows per product (per group in grouped_matmul)
_ERRORS = {-1: "unsupported quantization type", -2: "bad shape", -3: "out of memory"}


def available() -> bool:
    """Whether the kernels run here (AVX512-BF16/VNNI CPU, a C compiler, kernels not disabled)."""
    return kernel() is not None


def _lib():
    lib = kernel()
    if lib is None:
        raise RuntimeError("quantized-weight kernels are unavailable here (no AVX512-VNNI/BF16 "
                           "CPU, no C compiler, or LLAMA_MPI_NO_KERNELS set)")
    return lib


def _check(rc: int, what: str) -> None:
    if rc == -3:
        raise MemoryError(f"{what}: out of memory")
    if rc != 0:
        raise ValueError(f"{what}: {_ERRORS.get(rc, f'error {rc}')}")


def _qtype(qtype: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        qt = QT(int(qtype))
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    if qt not in SUPPORTED:
        raise ValueError(f"{qt.name} weights are not supported by the quantized kernels "
                         f"(supported: {', '.join(sorted(t.name for t in SUPPORTED))})")
    return qt


def _check_weight(qt: GGMLQuantizationType, w_raw: torch.Tensor, K: int, dims: int) -> None:
    block, size = GGML_QUANT_SIZES[qt]
    if K <= 0 or K % block:
        raise ValueError(f"{qt.name}: K={K} is not a positive multiple of the block ({block})")
    if w_raw.dtype is not torch.uint8 or w_raw.dim() != dims or w_raw.device.type != "cpu":
        raise ValueError(f"weights must be a {dims}-D uint8 CPU tensor of raw blocks, got "
                         f"{w_raw.dtype} {tuple(w_raw.shape)} on {w_raw.device}")
    if w_raw.shape[-1] < K // block * size or (w_raw.shape[-1] > 1 and w_raw.stride(-1) != 1):
        raise ValueError(f"{qt.name}: rows need {K // block * size} contiguous bytes for K={K}, "
                         f"got {w_raw.shape[-1]} (stride {w_raw.stride(-1)})")


@dataclass(frozen=True)
class QuantizedActivations:
    """Activation rows quantized for the kernels: ``q * d`` (per 32 values) approximates x."""

    q: torch.Tensor  # int8 [M, K]
    d: torch.Tensor  # float32 [M, K/32], amax/127 of each block
    sums: torch.Tensor  # int32 [M, K/16], sums of 16 consecutive q

    @property
    def rows(self) -> int:
        return self.q.shape[0]

    @property
    def K(self) -> int:
        return self.q.shape[1]

    def dequantize(self) -> torch.Tensor:
        """float32 [M, K]: the values the products actually use."""
        return (self.q.float().view(self.rows, -1, 32) * self.d[..., None]).view(self.rows, -1)


def quantize_activations(x: torch.Tensor) -> QuantizedActivations:
    """x [M, K] (float32 or bf16, K a multiple of 32; rows may be strided) -> int8 per 32."""
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu":
        raise ValueError(f"activations must be a 2-D float32/bf16 CPU tensor, got {x.dtype} "
                         f"{tuple(x.shape)} on {x.device}")
    M, K = x.shape
    if K % 32:
        raise ValueError(f"K={K} is not a multiple of 32")
    if x.stride(1) != 1:
        x = x.contiguous()
    q = torch.empty(M, K, dtype=torch.int8)
    d = torch.empty(M, K // 32, dtype=torch.float32)
    sums = torch.empty(M, K // 16, dtype=torch.int32)
    if M:
        rc = _lib().quantize_rows_q8(x.data_ptr(), int(x.dtype is torch.bfloat16), x.stride(0),
                                     M, K, q.data_ptr(), d.data_ptr(), sums.data_ptr(),
                                     torch.get_num_threads())
        _check(rc, "quantize_activations")
    return QuantizedActivations(q, d, sums)


def _activations(x: torch.Tensor | QuantizedActivations, K: int) -> QuantizedActivations:
    act = x if isinstance(x, QuantizedActivations) else quantize_activations(x)
    if act.K != K:
        raise ValueError(f"activations have K={act.K}, weights K={K}")
    return act


def _output(out: torch.Tensor | None, rows: int, N: int, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        out = torch.empty(rows, N, dtype=dtype)
    if (out.dtype not in (torch.float32, torch.bfloat16) or out.shape != (rows, N)
            or out.device.type != "cpu" or (N > 1 and out.stride(1) != 1)):
        raise ValueError(f"out must be a float32/bf16 CPU tensor [{rows}, {N}] with contiguous "
                         f"rows, got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    return out


def matmul(qtype: GGMLQuantizationType | int, w_raw: torch.Tensor, K: int,
           x: torch.Tensor | QuantizedActivations, out: torch.Tensor | None = None,
           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x @ W.T`` [M, N] for raw weight rows ``w_raw`` [N, row_bytes] of K values each, M <= 16.

    ``out`` (optional): a float32/bf16 view [M, N] with any row stride, written in place."""
    qt = _qtype(qtype)
    _check_weight(qt, w_raw, K, 2)
    act = _activations(x, K)
    M, N = act.rows, w_raw.shape[0]
    if not 0 < M <= MAX_ROWS:
        raise ValueError(f"matmul takes 1..{MAX_ROWS} activation rows, got {M}")
    y = _output(out, M, N, out_dtype if out is None else out.dtype)
    rc = _lib().quant_matmul(int(qt), w_raw.data_ptr(), w_raw.stride(0), act.q.data_ptr(),
                             act.d.data_ptr(), act.sums.data_ptr(), y.data_ptr(), y.stride(0),
                             int(y.dtype is torch.bfloat16), M, N, K, torch.get_num_threads())
    _check(rc, f"matmul({qt.name})")
    return y


def grouped_matmul(qtype: GGMLQuantizationType | int, w_raw: torch.Tensor, K: int,
                   x: torch.Tensor | QuantizedActivations, idx: list[int], counts: list[int],
                   out: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [R, K] in consecutive groups of ``counts[g]`` (<= 16) rows, group g times
    expert ``idx[g]`` of ``w_raw`` [E, N, row_bytes], into the same rows of ``out`` [R, N] (a
    float32/bf16 view with any row stride, e.g. one half of a wider buffer). Returns ``out``."""
    qt = _qtype(qtype)
    _check_weight(qt, w_raw, K, 3)
    act = _activations(x, K)
    E, N = w_raw.shape[0], w_raw.shape[1]
    if len(idx) != len(counts) or any(not 0 <= c <= MAX_ROWS for c in counts):
        raise ValueError(f"need one count (0..{MAX_ROWS}) per expert index, got idx={idx} "
                         f"counts={counts}")
    if any(not 0 <= e < E for e in idx):
        raise ValueError(f"expert index out of range 0..{E - 1}: {idx}")
    if sum(counts) != act.rows:
        raise ValueError(f"counts add up to {sum(counts)} rows, activations have {act.rows}")
    y = _output(out, act.rows, N, out.dtype)
    ids = torch.tensor(idx, dtype=torch.int64)
    starts = torch.tensor([0, *accumulate(counts)], dtype=torch.int64)
    rc = _lib().grouped_quant_matmul(
        int(qt), w_raw.data_ptr(), w_raw.stride(0), w_raw.stride(1), ids.data_ptr(),
        starts.data_ptr(), len(counts), act.q.data_ptr(), act.d.data_ptr(),
        act.sums.data_ptr(), y.data_ptr(), y.stride(0), int(y.dtype is torch.bfloat16), N, K,
        torch.get_num_threads())
    _check(rc, f"grouped_matmul({qt.name})")
    return y


def dequantize_rows(qtype: GGMLQuantizationType | int, w_raw: torch.Tensor, K: int,
                    rows: list[int] | torch.Tensor | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Rows ``rows`` (all rows if None) of ``w_raw`` [N, row_bytes] as ``dtype`` (float32 or
    bf16) [len(rows), K]: embedding lookups, or a weight tile for a dense prefill GEMM.
    float32 values equal ``gguf.quants.dequantize``; bf16 ones are those rounded to nearest."""
    qt = _qtype(qtype)
    _check_weight(qt, w_raw, K, 2)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be float32 or bf16, got {dtype}")
    N = w_raw.shape[0]
    ids = None
    if rows is not None:
        ids = torch.as_tensor(rows, dtype=torch.int64).reshape(-1).contiguous()
        if ids.numel() and not (0 <= int(ids.min()) and int(ids.max()) < N):
            raise IndexError(f"row index out of range 0..{N - 1}")
    n = N if ids is None else ids.numel()
    out = torch.empty(n, K, dtype=dtype)
    if n:
        rc = _lib().quant_dequant_rows(int(qt), w_raw.data_ptr(), w_raw.stride(0),
                                       None if ids is None else ids.data_ptr(), n, K,
                                       out.data_ptr(), int(dtype is torch.bfloat16),
                                       torch.get_num_threads())
        _check(rc, f"dequantize_rows({qt.name})")
    return out
