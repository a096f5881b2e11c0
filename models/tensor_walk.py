"""One walk over every weight a model part holds, so checks and counts cannot miss a part.

The model is plain objects (blocks, attention, MoE, router, experts, ...) holding tensors,
``QuantWeight``s and dicts of them. ``iter_weights`` visits them all with a dotted path, so
``check_finite`` covers routed and shared experts, the router, the norms, the embedding and
the head alike, whatever the execution mode built.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llama_mpi.models.kernels.quant_torch import dequantize
from llama_mpi.models.quant_weight import QuantWeight

Weight = torch.Tensor | QuantWeight
_ROW_CHUNK = 1 << 22  # elements dequantized at a time when checking quantized blocks


def _is_model_part(obj: Any) -> bool:
    # Model parts are our own objects; communicators and kernels are not weights.
    mod = type(obj).__module__
    return mod.startswith(("llama_mpi.models", "llama_mpi.moe")) and hasattr(obj, "__dict__")


def iter_weights(root: Any, prefix: str = "") -> Iterator[tuple[str, Weight]]:
    """``(path, weight)`` for every tensor and quantized weight reachable from ``root``."""
    seen: set[int] = set()

    def walk(obj: Any, path: str) -> Iterator[tuple[str, Weight]]:
        if id(obj) in seen:
            return
        if isinstance(obj, torch.Tensor | QuantWeight):
            seen.add(id(obj))
            yield path, obj
        elif isinstance(obj, dict):
            for key, value in obj.items():
                yield from walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(obj, list | tuple):
            for i, value in enumerate(obj):
                yield from walk(value, f"{path}.{i}" if path else str(i))
        elif _is_model_part(obj):
            seen.add(id(obj))
            for key, value in vars(obj).items():
                if not key.startswith("_"):
                    yield from walk(value, f"{path}.{key}" if path else key)

    yield from walk(root, prefix)


def is_finite(weight: Weight) -> bool:
    """No NaN or inf in the weight; quantized blocks are dequantized a chunk at a time."""
    if isinstance(weight, torch.Tensor):
        return not weight.is_floating_point() or bool(torch.isfinite(weight).all())
    for part in weight.parts:
        rows = part.raw.reshape(-1, part.raw.shape[-1]) if part.raw.dim() > 2 else part.raw
        step = max(1, _ROW_CHUNK // weight.K)
        for i in range(0, rows.shape[0], step):
            values = dequantize(rows[i:i + step], part.qtype, weight.K, torch.float32)
            if not torch.isfinite(values).all():
                return False
    return True


def check_finite(model: Any) -> int:
    """``check_tensors``: raise ``ValueError`` naming the first weight with NaN or inf.

    Returns the number of weights checked (each is read once)."""
    count = 0
    for path, weight in iter_weights(model):
        if not is_finite(weight):
            raise ValueError(f"check_tensors: {path} holds NaN or inf values")
        count += 1
    return count
