"""GGUF block dequantizers written in plain torch ops, so they run on any device.

``dequantize(raw, qtype, K)`` turns a uint8 tensor ``[..., row_bytes]`` holding K/block blocks per
row into ``[..., K]`` values on the same device. Nothing here touches numpy or reads a value back
to the host, so an accelerator can keep a layer's weights quantized in its memory and expand
them right before the matmul; on CPU the same code is the portable fallback. Work is vectorized
over every block of every row (no Python loop over blocks).

Values are computed in float32 and agree exactly with ``gguf.quants.dequantize`` (and llama.cpp's
``dequantize_row_*``): every product of an fp16 scale with the small integer scale and quant
fits in float32's 24-bit mantissa, so the only rounding is the final add of the min term, which
happens in the same order as the reference.

Block layouts: see ``shared/reference/quantized_gguf.md`` section 2 (all little-endian).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QT = GGMLQuantizationType
_F32 = torch.float32
# On CPU, expand this many elements at a time so the fp32 temporaries stay in cache: measured
# 2x faster than one pass over an 8M-element tensor (memory-bound otherwise). Accelerators get
# one pass (fewer kernel launches; their memory is fast).
_CPU_CHUNK_ELEMS = 1 << 19


def _fp16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] little-endian fp16 bytes -> [..., 1] float32.

    ``contiguous()`` makes the dtype view legal whatever the strides/offset of the input view
    (a block-aligned column slice of a wider tensor need not start on an even address).
    """
    return b.contiguous().view(torch.float16).to(_F32)


def _shifts(start: int, step: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """Bit offsets as a device tensor; arange runs on the device (no host-to-device copy)."""
    return torch.arange(start, start + step * n, step, dtype=torch.uint8, device=like.device)


def _nibbles32(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] 4-bit values: byte j holds element j (low) and j + 16 (high)."""
    return ((qs.unsqueeze(-2) >> _shifts(0, 4, 2, qs).unsqueeze(-1)) & 0x0F).flatten(-2)


def _bits32(qh: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes of a little-endian uint32 -> [..., 32] bits, bit j belongs to element j."""
    return ((qh.unsqueeze(-1) >> _shifts(0, 1, 8, qh)) & 1).flatten(-2)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, 32 x int8 q: d * q
    d = _fp16(b[..., 0:2])
    q = b[..., 2:34].view(torch.int8).to(_F32)
    return q.mul_(d)


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, 16 bytes of nibbles: d * (q - 8)
    d = _fp16(b[..., 0:2])
    q = _nibbles32(b[..., 2:18]).to(_F32)
    return q.sub_(8).mul_(d)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, uint32 of fifth bits, 16 bytes of nibbles: d * (q5 - 16)
    d = _fp16(b[..., 0:2])
    q = (_nibbles32(b[..., 6:22]) | (_bits32(b[..., 2:6]) << 4)).to(_F32)
    return q.sub_(16).mul_(d)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, fp16 m, uint32 of fifth bits, 16 bytes of nibbles: d * q5 + m
    d, m = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    q = (_nibbles32(b[..., 8:24]) | (_bits32(b[..., 4:8]) << 4)).to(_F32)
    return q.mul_(d).add_(m)


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 packed bytes -> 6-bit (scale, min) for the 8 sub-blocks, [..., 8] each.

    Bytes 0-3 / 4-7 carry sc0-3 / m0-3 in their low 6 bits and, in their top 2 bits, the high
    bits of sc4-7 / m4-7; bytes 8-11 carry the low 4 bits of sc4-7 (low nibble) and m4-7 (high).
    """
    lo_sc, lo_m, packed = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 0x3F, (packed & 0x0F) | ((lo_sc >> 6) << 4)], dim=-1)
    m = torch.cat([lo_m & 0x3F, (packed >> 4) | ((lo_m >> 6) << 4)], dim=-1)
    return sc, m


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: [..., 128] bytes -> [..., 8, 32]; chunk c's 32 bytes hold sub-blocks 2c (low
    nibbles) and 2c + 1 (high nibbles)."""
    chunks = qs.unflatten(-1, (4, 1, 32)) >> _shifts(0, 4, 2, qs).unsqueeze(-1)
    return (chunks & 0x0F).flatten(-3, -2)


def _k_apply(b: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K: d * sc_j * q - dmin * m_j for quants q [..., 8, 32] -> [..., 256]."""
    d, dmin = _fp16(b[..., 0:2]), _fp16(b[..., 2:4])
    sc, m = _k_scales(b[..., 4:16])
    scale = (d * sc.to(_F32)).unsqueeze(-1)
    offset = (dmin * m.to(_F32)).unsqueeze(-1)
    return q.to(_F32).mul_(scale).sub_(offset).flatten(-2)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    # fp16 d, fp16 dmin, 12 B scales, 128 B nibbles
    return _k_apply(b, _k_nibbles(b[..., 16:144]))


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    # as Q4_K plus 32 B of fifth bits before the nibbles: bit j of qh[l] -> sub-block j, element l
    qh = b[..., 16:48]
    high = (qh.unsqueeze(-2) >> _shifts(0, 1, 8, qh).unsqueeze(-1)) & 1
    return _k_apply(b, _k_nibbles(b[..., 48:176]) | (high << 4))


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    # 128 B low nibbles, 64 B 2-bit highs, 16 x int8 scales, fp16 d (last): d * sc_j * (q6 - 32).
    # Per 128-element half h, element 32k + l (k = 0..3) takes the low (k < 2) or high nibble of
    # ql[l + 32 (k % 2)] and bits 2k..2k+1 of qh[l]; sub-block j = 16 elements, in element order.
    ql = b[..., 0:128].unflatten(-1, (2, 1, 2, 32))  # [h, nibble, byte-half, l]
    low = (ql >> _shifts(0, 4, 2, ql).view(2, 1, 1)) & 0x0F  # [h, nibble, byte-half, l]
    low = low.flatten(-3, -2)  # [h, k = 2 * nibble + byte-half, l]
    qh = b[..., 128:192].unflatten(-1, (2, 1, 32))  # [h, 1, l]
    high = (qh >> _shifts(0, 2, 4, qh).unsqueeze(-1)) & 0x03  # [h, k, l]
    q = (low | (high << 4)).to(_F32).flatten(-3).unflatten(-1, (16, 16))
    scale = _fp16(b[..., 208:210]) * b[..., 192:208].view(torch.int8).to(_F32)
    return q.sub_(32).mul_(scale.unsqueeze(-1)).flatten(-2)


_BLOCK_FNS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q8_0: _q8_0,
    QT.Q4_0: _q4_0,
    QT.Q5_0: _q5_0,
    QT.Q5_1: _q5_1,
    QT.Q4_K: _q4_k,
    QT.Q5_K: _q5_k,
    QT.Q6_K: _q6_k,
}
SUPPORTED: frozenset[GGMLQuantizationType] = frozenset(_BLOCK_FNS)


def dequantize(raw: torch.Tensor, qtype: GGMLQuantizationType, K: int,
               dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 ``raw [..., row_bytes]`` (K/block blocks per row) -> ``[..., K]`` in ``dtype``.

    ``raw`` may be a strided view (e.g. a block-aligned column slice, or an expert stack
    ``[experts, rows, row_bytes]``) on any device; the result is a new tensor on that device.
    """
    fn = _BLOCK_FNS.get(qtype)
    if fn is None:
        name = getattr(qtype, "name", None) or str(qtype)
        have = ", ".join(sorted(t.name for t in SUPPORTED))
        raise ValueError(f"no torch dequantizer for GGUF type {name} (supported: {have})")
    qtype = QT(qtype)  # a plain int is accepted too; messages use the name
    block, size = GGML_QUANT_SIZES[qtype]
    if raw.dtype != torch.uint8:
        raise ValueError(f"{qtype.name}: raw bytes must be uint8, got {raw.dtype}")
    if K % block:
        raise ValueError(f"{qtype.name}: K={K} is not a multiple of the block size {block}")
    if raw.dim() == 0 or raw.shape[-1] != K // block * size:
        raise ValueError(f"{qtype.name}: K={K} needs {K // block * size} bytes per row, "
                         f"got shape {tuple(raw.shape)}")
    if raw.device.type != "cpu" or math.prod(raw.shape[:-1]) * K <= _CPU_CHUNK_ELEMS:
        return _expand(fn, raw, K // block, size).to(dtype)
    out = torch.empty((*raw.shape[:-1], K), dtype=dtype)
    rows, out_rows = raw.reshape(-1, raw.shape[-1]), out.view(-1, K)  # reshape: view if it can
    step = max(1, _CPU_CHUNK_ELEMS // K)
    for i in range(0, rows.shape[0], step):
        out_rows[i:i + step] = _expand(fn, rows[i:i + step], K // block, size)
    return out


def _expand(fn: Callable[[torch.Tensor], torch.Tensor], raw: torch.Tensor, n_blocks: int,
            size: int) -> torch.Tensor:
    blocks = raw.unflatten(-1, (n_blocks, size))  # a view when the last dim is contiguous
    return fn(blocks).flatten(-2)
