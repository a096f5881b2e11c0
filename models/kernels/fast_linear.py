"""``linear(x, w)``: F.linear, except for decode-shaped bf16 products on CPUs with AVX512-BF16.

Decode multiplies one to a few activation rows by every weight of the model, so tokens per
second are set by how fast weights stream from memory. ``bf16_gemv.c`` (see ``cpu_kernels``)
reads weights ~1.5x faster than torch's CPU path here. Where the kernels cannot be built,
every call is plain ``F.linear``. Quantized weights (``QuantWeight``) bring their own
backend, chosen at load; these functions are the one place that hands them over.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from llama_mpi.models.kernels.cpu_kernels import kernel, require_kernel
from llama_mpi.models.quant_weight import QuantWeight

MAX_ROWS = 16  # the kernel's limit; it outpaces torch at every row count up to here (measured)


def _use_kernel(x: torch.Tensor, w: torch.Tensor, rows: int) -> bool:
    return (w.dtype is torch.bfloat16 and x.dtype is torch.bfloat16 and x.device.type == "cpu"
            and 0 < rows <= MAX_ROWS and w.is_contiguous() and kernel() is not None)


def linear(x: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
    """``x @ w.T`` for ``x`` [..., K] and ``w`` [N, K]."""
    if isinstance(w, QuantWeight):
        lead = x.shape[:-1]
        return w.matmul(x.reshape(-1, x.shape[-1]).contiguous()).view(*lead, w.shape[-2])
    if x.dim() == 2 and _use_kernel(x, w, x.shape[0]):
        x = x.contiguous()
        m, (n, k) = x.shape[0], w.shape
        y = torch.empty(m, n, dtype=torch.bfloat16)
        require_kernel().skinny_bf16_matmul(w.data_ptr(), x.data_ptr(), y.data_ptr(), m, n, k,
                                            torch.get_num_threads())
        return y
    return F.linear(x, w)


def batched_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x[b] @ w[b].T`` for ``x`` [B, M, K] and ``w`` [B, N, K] (e.g. per attention head)."""
    if x.dim() == 3 and _use_kernel(x, w, x.shape[1]):
        x = x.contiguous()
        (b, m, _), n, k = x.shape, w.shape[1], w.shape[2]
        y = torch.empty(b, m, n, dtype=torch.bfloat16)
        require_kernel().batched_skinny_bf16_matmul(w.data_ptr(), x.data_ptr(), y.data_ptr(),
                                                    b, m, n, k, torch.get_num_threads())
        return y
    return torch.bmm(x, w.transpose(1, 2))


def embedding(ids: torch.Tensor, w: torch.Tensor | QuantWeight) -> torch.Tensor:
    """Rows ``ids`` of an embedding table in float32 (the residual stream's dtype)."""
    if isinstance(w, QuantWeight):
        return w.rows(ids, torch.float32)
    return F.embedding(ids, w).float()


def grouped_matmul(x: torch.Tensor, w: torch.Tensor | QuantWeight, idx: list[int],
                   counts: list[int]) -> torch.Tensor | None:
    """Rows of ``x`` [R, K] in consecutive groups of ``counts[g]`` rows, group g times
    ``w[idx[g]].T`` for a stacked ``w`` [E, N, K]: a decode batch's routed experts in one call.
    None where the kernel cannot take it (unavailable, or a group over MAX_ROWS rows)."""
    if isinstance(w, QuantWeight):
        return w.grouped(x.contiguous(), idx, counts)
    if not (x.dim() == 2 and w.dim() == 3 and max(counts, default=0) <= MAX_ROWS
            and _use_kernel(x, w, 1)):
        return None
    x = x.contiguous()
    ids = torch.tensor(idx, dtype=torch.int64)
    starts = torch.tensor([0, *accumulate(counts)], dtype=torch.int64)
    y = torch.empty(x.shape[0], w.shape[1], dtype=torch.bfloat16)
    require_kernel().grouped_bf16_matmul(w.data_ptr(), ids.data_ptr(), starts.data_ptr(),
                                         x.data_ptr(), y.data_ptr(), len(counts), w.shape[1],
                                         w.shape[2], torch.get_num_threads())
    return y
