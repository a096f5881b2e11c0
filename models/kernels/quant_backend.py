"""How quantized weights are multiplied: one backend per weight, chosen once at load.

``NativeCPUBackend`` runs the C kernels straight on the GGUF blocks (``quant_kernels``:
integer dot products for up to 16 activation rows, the grouped per-expert form for MoE
batches); bigger batches (prefill) dequantize a tile of weight rows at a time to the
activations' dtype and run a torch GEMM on it, so no full-size dense copy ever exists.
``TorchBackend`` does the same tiling with torch-only dequantizers (``quant_torch``): the
path for CUDA / NPU devices without a native kernel, and the portable CPU fallback.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from llama_mpi.models.quant_weight import QuantPart, QuantWeight

log = logging.getLogger(__name__)

TILE_BYTES = 8 << 20  # a dequantized tile of weight rows (fits the L3 with room to spare)


class QuantBackend(ABC):
    name = "abstract"

    @abstractmethod
    def dequantize_part(self, part: QuantPart, K: int, dtype: torch.dtype) -> torch.Tensor:
        """``part`` as a dense ``[..., rows, K]`` tensor in ``dtype`` on its device."""

    def matmul(self, w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
        return self.tiled_matmul(w, x)

    def grouped(self, w: QuantWeight, x: torch.Tensor, idx: list[int], counts: list[int]
                ) -> torch.Tensor | None:
        """Experts ``idx`` over consecutive row groups in one call; None: the caller loops."""
        return None

    def rows(self, w: QuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from llama_mpi.models.quant_weight import QuantPart

        (part,) = w.parts  # an embedding table is one tensor
        return self.dequantize_part(QuantPart(part.qtype, part.raw[ids]), w.K, dtype)

    def dequantize(self, w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self.dequantize_part(p, w.K, dtype) for p in w.parts], dim=-2)

    def tiled_matmul(self, w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` one tile of weight rows at a time: dequantize, GEMM, next tile."""
        from llama_mpi.models.quant_weight import QuantPart

        out = torch.empty(x.shape[0], w.shape[-2], dtype=x.dtype, device=x.device)
        tile = max(16, TILE_BYTES // (w.K * x.element_size()))
        col = 0
        for p in w.parts:
            for n0 in range(0, p.rows, tile):
                n1 = min(n0 + tile, p.rows)
                dense = self.dequantize_part(QuantPart(p.qtype, p.raw[n0:n1]), w.K, x.dtype)
                out[:, col + n0 : col + n1] = torch.mm(x, dense.t())
            col += p.rows
        return out


class TorchBackend(QuantBackend):
    """Dequantize on the weight's own device with torch ops, tile by tile."""

    name = "torch-dequant"

    def dequantize_part(self, part: QuantPart, K: int, dtype: torch.dtype) -> torch.Tensor:
        from llama_mpi.models.kernels.quant_torch import dequantize

        return dequantize(part.raw, part.qtype, K, dtype)


class NativeCPUBackend(QuantBackend):
    """The C kernels: integer dot products on the blocks for decode-sized batches."""

    name = "cpu-kernels"
    MAX_ROWS = 16  # the kernels' row limit per call
    # up to this many rows the kernels run in 16-row chunks (each chunk streams the weight
    # again, from cache for small weights); beyond, dequantized tiles + a bf16 GEMM win
    # (measured on a 3072 x 2048 Q4_K weight: 64 rows 2.4 ms chunked vs 6.2 ms tiled)
    CHUNKED_MAX_ROWS = 128

    def dequantize_part(self, part: QuantPart, K: int, dtype: torch.dtype) -> torch.Tensor:
        from llama_mpi.models.kernels import quant_kernels as qk

        raw = part.raw
        flat = raw.reshape(-1, raw.shape[-1]) if raw.dim() != 2 else raw
        native = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
        out = qk.dequantize_rows(part.qtype, flat, K, dtype=native).view(*raw.shape[:-1], K)
        return out.to(dtype)  # float16 compute: through float32

    def matmul(self, w: QuantWeight, x: torch.Tensor) -> torch.Tensor:
        from llama_mpi.models.kernels import quant_kernels as qk

        if x.shape[0] > self.CHUNKED_MAX_ROWS or x.dtype not in (torch.bfloat16, torch.float32):
            return self.tiled_matmul(w, x)
        out = torch.empty(x.shape[0], w.shape[-2], dtype=x.dtype)
        for r in range(0, x.shape[0], self.MAX_ROWS):
            act = qk.quantize_activations(x[r : r + self.MAX_ROWS])
            col = 0
            for p in w.parts:
                qk.matmul(p.qtype, p.raw, w.K, act,
                          out=out[r : r + self.MAX_ROWS, col : col + p.rows])
                col += p.rows
        return out

    def grouped(self, w: QuantWeight, x: torch.Tensor, idx: list[int], counts: list[int]
                ) -> torch.Tensor | None:
        from llama_mpi.models.kernels import quant_kernels as qk

        if max(counts, default=0) > self.MAX_ROWS or x.dtype not in (torch.bfloat16,
                                                                     torch.float32):
            return None
        act = qk.quantize_activations(x)
        out = torch.empty(x.shape[0], w.shape[-2], dtype=x.dtype)
        col = 0
        for p in w.parts:
            qk.grouped_matmul(p.qtype, p.raw, w.K, act, idx, counts,
                              out=out[:, col : col + p.rows])
            col += p.rows
        return out

    def rows(self, w: QuantWeight, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from llama_mpi.models.kernels import quant_kernels as qk

        (part,) = w.parts
        return qk.dequantize_rows(part.qtype, part.raw, w.K, rows=ids, dtype=dtype)


BACKENDS = ("auto", "native", "torch", "dequantize")


def choose_backend(kind: str, device: torch.device) -> QuantBackend | None:
    """The backend for every quantized weight of a model; None: dequantize at load.

    ``auto``: the C kernels on a CPU where they build, else torch dequantization on the
    device (CUDA / NPU, or a CPU without AVX512-VNNI / a compiler)."""
    if kind not in BACKENDS:
        raise ValueError(f"quant_backend must be one of {BACKENDS}, not {kind!r}")
    if kind == "dequantize":
        return None
    if kind == "torch":
        return TorchBackend()
    native = False
    if device.type == "cpu":
        from llama_mpi.models.kernels import quant_kernels as qk

        native = qk.available()
    if kind == "native" and not native:
        raise ValueError("quant_backend: native needs the CPU kernels (a CPU with "
                         "AVX512-VNNI/BF16 and a C compiler); use auto or torch")
    return NativeCPUBackend() if native else TorchBackend()
