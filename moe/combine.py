"""Summing routed-expert outputs back into their tokens, weighted by the router."""

from __future__ import annotations

import torch

from llama_mpi.models.kernels.cpu_kernels import kernel, require_kernel


def weighted_scatter_add(out: torch.Tensor, rows: torch.Tensor, y: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """``out[rows[p]] += weights[p] * y[p]`` in float32, in place; returns ``out``.

    ``out`` [T, E] float32, ``rows`` [P] int64, ``y`` [P, E] expert outputs (any float
    dtype), ``weights`` [P] float32. One pass over ``y`` where the C kernel serves (bf16 on
    a CPU), else torch's ``index_add_`` of a float32 product.
    """
    if (y.dtype is torch.bfloat16 and out.dtype is torch.float32 and y.device.type == "cpu"
            and out.is_contiguous() and kernel() is not None):
        y = y.contiguous()
        rows = rows.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        require_kernel().weighted_scatter_add_bf16(out.data_ptr(), y.data_ptr(), rows.data_ptr(),
                                                   weights.data_ptr(), y.shape[0], y.shape[1],
                                                   torch.get_num_threads())
        return out
    return out.index_add_(0, rows, y.float() * weights[:, None])
