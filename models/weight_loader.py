"""Load one weight the way this model keeps it: GGUF blocks, or a dense tensor.

Dispatch is per tensor, never per file: a Q4_K_M file mixes Q4_K, Q6_K, Q5_0, Q8_0 and F32.
A tensor of a kept type (``KEPT_TYPES``) becomes a ``QuantWeight`` over the mapped bytes;
anything else is dequantized (or converted) to the compute dtype, with a log line when that
was not the caller's choice. Row slices (experts, heads, vocabulary rows) always cut between
blocks; a slice along the row that cuts a block is dequantized, and the log says so.
``WeightPolicy`` counts what stays mapped and what was copied, for the memory log.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.kernels.quant_backend import QuantBackend
from llama_mpi.models.quant_weight import KEPT_TYPES, QuantPart, QuantWeight

log = logging.getLogger(__name__)

Weight = torch.Tensor | QuantWeight
# file types whose tensors are used in place when the compute dtype is theirs
NATIVE_DTYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


@dataclass
class WeightPolicy:
    dtype: torch.dtype  # compute dtype: dense weights and dequantized tensors
    backend: QuantBackend | None  # None: dequantize every quantized tensor at load
    use_mmap: bool = True
    mapped_bytes: int = 0  # weights read in place from the file mapping
    copied_bytes: int = 0  # weights copied: dequantized, converted, concatenated
    dequantized: list[str] = field(default_factory=list)  # kept types dequantized anyway

    def count(self, w: Weight, mapped: bool) -> Weight:
        n = w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()
        if mapped and self.use_mmap:
            self.mapped_bytes += n
        else:
            self.copied_bytes += n
        return w


def load_weight(gf: GGUFFile, name: str, policy: WeightPolicy, *, dim: int = 0,
                start: int | None = None, stop: int | None = None,
                expect: tuple[int, ...] | None = None, dense: bool = False) -> Weight:
    """Tensor ``name`` (optionally ``[start:stop]`` of dimension ``dim``) as kept by
    ``policy``; ``dense=True`` asks for a tensor whatever the type (small weights that run
    through batched per-head products)."""
    info = gf.check_shape(name, expect) if expect is not None else gf.info(name)
    q = info.qtype
    if dense or policy.backend is None or q not in KEPT_TYPES:
        if q not in KEPT_TYPES and q not in NATIVE_DTYPES:
            log.info("%s: %s is not computed on quantized; dequantized to %s at load", name,
                     q.name, str(policy.dtype).removeprefix("torch."))
        t = gf.load(name, policy.dtype, dim=dim, start=start, stop=stop)
        mapped = NATIVE_DTYPES.get(q) == policy.dtype
        if mapped and policy.use_mmap:
            gf.populate(t)
        return policy.count(t, mapped=mapped)
    shape = info.shape
    dim %= len(shape)
    lo, hi = start or 0, shape[dim] if stop is None else stop
    if not 0 <= lo < hi <= shape[dim]:
        raise ValueError(f"{gf.path}: slice [{lo}:{hi}] out of range for '{name}' {shape}")
    raw, K = gf.blocks(info), shape[-1]
    block, size = GGML_QUANT_SIZES[q]
    if dim == len(shape) - 1 and (lo, hi) != (0, K):
        if lo % block or hi % block:
            return policy.count(_dequantized_columns(gf, name, policy, lo, hi, block), False)
        raw, K = raw[..., lo // block * size : hi // block * size], hi - lo
    elif (lo, hi) != (0, shape[dim]):
        raw = raw.narrow(dim, lo, hi - lo)
    w = QuantWeight([QuantPart(q, raw)], K, policy.backend, name)
    if policy.use_mmap:
        gf.populate(raw)
    return policy.count(w if policy.use_mmap else w.clone(), mapped=True)


def as_dense(w: Weight, name: str) -> torch.Tensor:
    """``w`` where a tensor is required (a weight loaded with ``dense=True``)."""
    if isinstance(w, QuantWeight):
        raise TypeError(f"{name}: quantized where a dense tensor is needed")
    return w


def _dequantized_columns(gf: GGUFFile, name: str, policy: WeightPolicy, lo: int, hi: int,
                         block: int) -> torch.Tensor:
    """Columns ``[lo:hi]`` that cut the file's blocks: correct only dequantized."""
    t = gf.load(name, policy.dtype, dim=-1, start=lo, stop=hi)
    policy.dequantized.append(name)
    log.info("%s: columns [%d:%d] cut its %d-element %s blocks; this slice is dequantized "
             "to %s (%.1f MiB)", name, lo, hi, block, gf.info(name).qtype.name,
             str(policy.dtype).removeprefix("torch."), t.numel() * t.element_size() / 2**20)
    return t


def stack_rows(gf: GGUFFile, weights: list[Weight], names: list[str], policy: WeightPolicy
               ) -> Weight:
    """Weights stacked along their output rows (gate rows, then up rows). Quantized parts
    are stacked without a copy; dense ones are concatenated and their file pages released,
    so the copy is not counted twice in RSS."""
    quantized = [w for w in weights if isinstance(w, QuantWeight)]
    if len(quantized) == len(weights):
        return QuantWeight.concat(quantized, "|".join(names))
    dense = [w.dequantize(policy.dtype) if isinstance(w, QuantWeight) else w for w in weights]
    out = torch.cat(dense, dim=-2)
    for w, n in zip(weights, names, strict=True):  # the parts were counted at their load
        n_bytes = w.nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()
        if policy.use_mmap and (isinstance(w, QuantWeight)
                                or NATIVE_DTYPES.get(gf.info(n).qtype) == policy.dtype):
            policy.mapped_bytes -= n_bytes
        else:
            policy.copied_bytes -= n_bytes
        gf.release(gf.info(n))
    return policy.count(out, mapped=False)
