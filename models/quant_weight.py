"""GGUF-quantized weights kept as the file's own blocks.

A ``QuantWeight`` is a matrix ``[N, K]`` (or a stack of them, ``[E, N, K]``: routed experts)
whose bytes stay where the GGUF file maps them: no copy, no dequantization at load. It may be
made of several row parts stacked along ``N`` without copying (gate and up projections run as
one ``gate_up``), each part with its own GGUF type, since one file mixes types per tensor.
How it is multiplied is decided once, at load, by its ``QuantBackend`` (``quant_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llama_mpi.models.kernels.quant_backend import QuantBackend

# the types computed on directly; any other type is dequantized at load (log line per tensor)
KEPT_TYPES = frozenset({QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K})


@dataclass(frozen=True)
class QuantPart:
    """``raw`` holds ``rows`` rows of ``K`` elements as GGUF blocks: uint8 ``[..., rows, B]``
    where B is the packed row size; rows may be strided (a block-aligned column slice)."""

    qtype: QT
    raw: torch.Tensor

    @property
    def rows(self) -> int:
        return self.raw.shape[-2]


class QuantWeight:
    def __init__(self, parts: list[QuantPart], K: int, backend: QuantBackend, name: str
                 ) -> None:
        lead = {p.raw.shape[:-2] for p in parts}
        if len(lead) != 1:
            raise ValueError(f"{name}: parts with different leading shapes {sorted(lead)}")
        for p in parts:
            block, size = GGML_QUANT_SIZES[p.qtype]
            if K % block or p.raw.shape[-1] != K // block * size or p.raw.dtype != torch.uint8:
                raise ValueError(f"{name}: {p.qtype.name} part {tuple(p.raw.shape)} does not "
                                 f"hold rows of {K} elements")
        self.parts, self.K, self.backend, self.name = parts, K, backend, name
        self.shape = (*next(iter(lead)), sum(p.rows for p in parts), K)

    @classmethod
    def concat(cls, weights: list[QuantWeight], name: str) -> QuantWeight:
        """Stack along the rows (``N``) without copying: e.g. gate rows then up rows."""
        return cls([p for w in weights for p in w.parts], weights[0].K, weights[0].backend,
                   name)

    # --- tensor-like surface used by the model (shapes, counts, placement) ---
    @property
    def device(self) -> torch.device:
        return self.parts[0].raw.device

    @property
    def qtypes(self) -> tuple[QT, ...]:
        return tuple(p.qtype for p in self.parts)

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(p.raw.shape[-1] * prod(p.raw.shape[:-1]) for p in self.parts)

    def __getitem__(self, index: int) -> QuantWeight:
        """One matrix of a stack (an expert)."""
        return QuantWeight([QuantPart(p.qtype, p.raw[index]) for p in self.parts], self.K,
                           self.backend, f"{self.name}[{index}]")

    def to(self, device: torch.device) -> QuantWeight:
        if torch.device(device) == self.device:
            return self
        return QuantWeight([QuantPart(p.qtype, p.raw.to(device)) for p in self.parts], self.K,
                           self.backend, self.name)

    def clone(self) -> QuantWeight:
        """A private copy of the blocks (``use_mmap: false``)."""
        return QuantWeight([QuantPart(p.qtype, p.raw.clone()) for p in self.parts], self.K,
                           self.backend, self.name)

    # --- compute, through the backend chosen at load ---
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [M, K] (2-D weights)."""
        return self.backend.matmul(self, x)

    def grouped(self, x: torch.Tensor, idx: list[int], counts: list[int]
                ) -> torch.Tensor | None:
        """Consecutive row groups of ``x`` through experts ``idx`` of a stack, or None."""
        return self.backend.grouped(self, x, idx, counts)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` dequantized (an embedding lookup)."""
        return self.backend.rows(self, ids, dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.backend.dequantize(self, dtype)

    def __repr__(self) -> str:
        types = "+".join(q.name for q in self.qtypes)
        return f"QuantWeight({self.name}, {list(self.shape)}, {types}, {self.backend.name})"
