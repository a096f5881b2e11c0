"""Zero-copy MPI buffer specs for torch CPU tensors, and sum ops for 16-bit floats.

`tensor.numpy()` shares memory with the tensor, so MPI reads and writes it directly.
numpy has no bfloat16, so bf16 travels as raw 2-byte words (UINT16_T): bit-exact for
moves, and summed by a user-defined Op that reinterprets the words as torch bf16.
"""

from __future__ import annotations

from functools import cache

import torch
from mpi4py import MPI

# dtype -> (view dtype for .numpy(), MPI datatype); a None MPI type means "not native".
_NATIVE: dict[torch.dtype, tuple[torch.dtype, MPI.Datatype]] = {
    torch.float32: (torch.float32, MPI.FLOAT),
    torch.float64: (torch.float64, MPI.DOUBLE),
    torch.int32: (torch.int32, MPI.INT32_T),
    torch.int64: (torch.int64, MPI.INT64_T),
    torch.int16: (torch.int16, MPI.INT16_T),
    torch.int8: (torch.int8, MPI.INT8_T),
    torch.uint8: (torch.uint8, MPI.UINT8_T),
    torch.bool: (torch.uint8, MPI.UINT8_T),
}


def _has(dt: MPI.Datatype) -> bool:
    return dt != MPI.DATATYPE_NULL


def move_spec(t: torch.Tensor) -> tuple[object, MPI.Datatype]:
    """(numpy view, MPI type) to send/receive `t` bit-exactly; `t` must be CPU contiguous."""
    if t.dtype in _NATIVE:
        view_dtype, mpi_type = _NATIVE[t.dtype]
        return t.view(view_dtype).numpy(), mpi_type
    if t.element_size() == 2:  # bf16 / fp16: move as 2-byte words
        return t.view(torch.int16).numpy(), MPI.UINT16_T
    raise TypeError(f"dtype {t.dtype} not supported by the MPI communicator")


def _sum_16bit(dtype: torch.dtype):
    def fn(inbuf, inoutbuf, datatype) -> None:
        # 2-byte words in, so a value is never split across calls; add in torch's dtype.
        acc = torch.frombuffer(inoutbuf, dtype=dtype)
        acc.add_(torch.frombuffer(inbuf, dtype=dtype))

    return fn


@cache
def sum_op(dtype: torch.dtype) -> MPI.Op:
    """MPI.SUM where MPI sums `dtype` natively, else a commutative user Op on UINT16_T."""
    if dtype is torch.bool:  # a uint8 sum would wrap; callers should reduce ints instead
        raise TypeError("summing bool tensors is not supported")
    if dtype in _NATIVE:
        return MPI.SUM
    if dtype in (torch.bfloat16, torch.float16):
        return MPI.Op.Create(_sum_16bit(dtype), commute=True)
    raise TypeError(f"dtype {dtype} not supported for MPI reductions")


def reduce_spec(t: torch.Tensor) -> tuple[object, MPI.Datatype, MPI.Op]:
    """(numpy view, MPI type, op) to sum `t` in place."""
    if t.dtype == torch.float16 and _has(MPI.FLOAT16_T):  # MPI 4.1+ (MPICH 5) sums fp16
        return t.view(torch.int16).numpy(), MPI.FLOAT16_T, MPI.SUM
    view, mpi_type = move_spec(t)
    return view, mpi_type, sum_op(t.dtype)


_ROW_TYPES: dict[tuple[int, int], MPI.Datatype] = {}


def row_type(base: MPI.Datatype, row_elems: int) -> MPI.Datatype:
    """Contiguous type for one row, so Alltoallv counts are rows (no int32 overflow)."""
    key = (base.py2f(), row_elems)  # Datatype objects are not hashable
    dt = _ROW_TYPES.get(key)
    if dt is None:
        dt = base.Create_contiguous(row_elems)
        dt.Commit()
        _ROW_TYPES[key] = dt
    return dt
