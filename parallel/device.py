"""Pick this rank's torch device from the visible device list.

npu if ASCEND_RT_VISIBLE_DEVICES is set, cuda if CUDA_VISIBLE_DEVICES is set (or torch sees
a GPU), else cpu; a rank uses device index `local_rank % visible count`. torch_npu is only
imported when an NPU is asked for.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, cast

import torch

NPU_HINT = "Install llama-mpi[npu] and CANN"


def import_torch_npu() -> ModuleType:
    """Import torch_npu or raise a RuntimeError saying why and what to install."""
    try:
        import torch_npu
    except (ImportError, OSError, RuntimeError) as exc:  # no wheel / no CANN libs
        raise RuntimeError(
            "device 'npu' requested but torch_npu could not be imported: "
            f"{type(exc).__name__}: {exc}. {NPU_HINT}"
        ) from exc
    return torch_npu


def _visible(var: str) -> bool:
    return bool(os.environ.get(var, "").strip())


def auto_device_type() -> str:
    if _visible("ASCEND_RT_VISIBLE_DEVICES"):
        return "npu"
    if _visible("CUDA_VISIBLE_DEVICES") or torch.cuda.is_available():
        return "cuda"
    return "cpu"


def device_count(dev_type: str) -> int:
    if dev_type == "npu":
        import_torch_npu()
        npu = cast(Any, torch).npu  # registered on torch by torch_npu at import, not typed
        return npu.device_count() if npu.is_available() else 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str = "auto", local_rank: int = 0) -> torch.device:
    """torch.device for this rank, made current for cuda/npu.

    `requested` is "auto", "cpu", "cuda", "npu", or a type with an explicit index
    ("cuda:1"), which overrides the local-rank mapping.
    """
    spec = auto_device_type() if requested == "auto" else requested
    # Parse by hand: torch.device("npu") is only valid once torch_npu is imported.
    dev_type, _, index_str = spec.partition(":")
    if dev_type == "cpu":
        return torch.device("cpu")
    if dev_type not in ("cuda", "npu"):
        raise ValueError(f"unsupported device {requested!r}: use auto, cpu, cuda or npu")
    count = device_count(dev_type)
    if count == 0:
        var = "ASCEND_RT_VISIBLE_DEVICES" if dev_type == "npu" else "CUDA_VISIBLE_DEVICES"
        raise RuntimeError(
            f"device {dev_type!r} requested but no {dev_type} device is available "
            f"({var}={os.environ.get(var)!r})"
        )
    index = int(index_str) if index_str else local_rank % count
    getattr(torch, dev_type).set_device(index)
    return torch.device(dev_type, index)
