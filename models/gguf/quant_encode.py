"""Encode float32 rows as GGML blocks: Q8_0/Q4_0/Q5_0/Q5_1 via gguf.quants, K-quants here.

gguf-py only *dequantizes* Q4_K/Q5_K/Q6_K, so this module has its own vectorized encoders with
llama.cpp's block layouts (shared/reference/quantized_gguf.md section 2) and the shape of its
reference quantizers (`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c): per-sub-block weighted
least-squares scale (and min) search, then 6-/8-bit quantized sub-block scales against one fp16
super-block scale, then the values requantized against the stored scales.

By default the search is cheaper than llama.cpp's, since it is the builder's bottleneck on big
models: Q4_K/Q5_K try 5 of make_qkx2_quants' 21 (Q4_K) / 16 (Q5_K) candidate inverse scales and
Q6_K 4 of make_qx_quants' 19 (`FAST_STEPS`). On N(0, 1) rows that costs +0.9 % (Q4_K), +0.7 %
(Q5_K), +0.2 % (Q6_K) RMS error over llama.cpp's reference quantizer; measured single-threaded
here ~60 (Q4_K), ~55 (Q5_K), ~85 (Q6_K) M values/s against llama.cpp's scalar C reference's
15 / 18 / 35. `exhaustive=True` tries every candidate and then gives llama.cpp's bytes for
96-100 % of super-blocks (the rest differ by float rounding in near-ties). The fit error comes from
closed-form weighted sums instead of a second pass over the values. Work is done in chunks of
`CHUNK` super-blocks so temporaries stay in cache and memory stays bounded.
"""

from __future__ import annotations

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType
QK_K = 256
CHUNK = 1024  # super-blocks per pass: 256 K values, 1 MB per float32 temporary (fastest)
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: below this a group counts as all zero
_GGUF_TYPES = (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1)
# make_qkx2_quants as llama.cpp calls it: (nmax, rmin, rdelta); candidate `step` has inverse
# scale (nmax + rmin + rdelta * step) / (max - min)
QKX2 = {QT.Q4_K: (15, -1.0, 0.1), QT.Q5_K: (31, -0.5, 0.1)}
# make_qx_quants (Q6_K): candidate `step` has inverse scale -(32 + 0.1 * step) / max
ALL_STEPS = {QT.Q4_K: tuple(range(21)), QT.Q5_K: tuple(range(16)),
             QT.Q6_K: tuple(s for s in range(-9, 10) if s)}
FAST_STEPS = {QT.Q4_K: (2, 6, 10, 14, 18), QT.Q5_K: (1, 4, 7, 10, 13), QT.Q6_K: (-8, -4, 4, 8)}


def block_bytes(qtype: QT) -> tuple[int, int]:
    """(values per block, bytes per block) for `qtype`."""
    return gguf.GGML_QUANT_SIZES[qtype]


def quantize(x: np.ndarray, qtype: QT, *, exhaustive: bool = False) -> np.ndarray:
    """x float [..., K] -> uint8 [..., K / block * bytes] in `qtype`'s GGML block layout.

    `exhaustive` (K-quants only): llama.cpp's full scale search instead of the fast subset.
    """
    x = np.asarray(x, dtype=np.float32)
    if qtype in _GGUF_TYPES:
        return gguf.quants.quantize(x, qtype)
    if qtype not in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        raise ValueError(f"no encoder for {qtype.name}")
    if x.ndim == 0 or x.shape[-1] % QK_K:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {QK_K} values, "
                         f"got shape {x.shape}")
    nbytes, steps = block_bytes(qtype)[1], (ALL_STEPS if exhaustive else FAST_STEPS)[qtype]
    flat = np.ascontiguousarray(x).reshape(-1, QK_K)
    out = np.empty((flat.shape[0], nbytes), dtype=np.uint8)
    for s in range(0, flat.shape[0], CHUNK):
        blocks = flat[s:s + CHUNK]
        out[s:s + CHUNK] = (_q6_k(blocks, steps) if qtype == QT.Q6_K
                            else _q45_k(blocks, qtype, steps))
    return out.reshape(*x.shape[:-1], x.shape[-1] // QK_K * nbytes)


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 bytes [n, 2], the fp16 value back in float32); fp16 rounds to nearest even."""
    h = v.astype(np.float16)
    return h.view(np.uint8).reshape(-1, 2), h.astype(np.float32)


def _coldot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-column dot product of two [g, m] arrays."""
    return np.einsum("ij,ij->j", a, b)


# Groups are processed transposed, [group size, n groups]: per-group values then broadcast and
# reduce along the long contiguous axis, which numpy does ~10x faster than along rows of 16/32.


def _fit_scale_min(xt: np.ndarray, nmax: int, rmin: float, rdelta: float,
                   steps: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """make_qkx2_quants on groups xt [32, m]: (scale, -min) with x ~ scale * L + min."""
    mn = np.minimum(xt.min(axis=0), 0)  # the offset never goes above zero
    mx = xt.max(axis=0)
    # llama.cpp's importance weights when there is no imatrix: rms of the group + |x|
    w = np.abs(xt)
    w += np.sqrt(np.einsum("ij,ij->j", xt, xt) / xt.shape[0])
    sw, swx = w.sum(axis=0), _coldot(w, xt)  # float32 sums throughout, as llama.cpp
    swx2 = _coldot(w * xt, xt)
    flat = mx == mn
    mx = np.where(flat, mn + 1, mx)  # any range: flat groups keep scale 0 below
    lev = np.empty_like(xt)
    scale, the_min = (mx - mn) / np.float32(nmax), mn.copy()
    best: np.ndarray | None = None
    # step None is the starting point: plain min/max scaling, no refit; then as in llama.cpp
    # each candidate levels the values against the best offset found so far
    for step in (None, *steps):
        lo = the_min.astype(np.float32)
        top = nmax if step is None else nmax + rmin + rdelta * step
        np.subtract(xt, lo, out=lev)
        lev *= np.float32(top) / (mx - lo)
        np.clip(np.rint(lev, out=lev), 0, nmax, out=lev)
        wl = w * lev
        sl, sl2, sxl = wl.sum(axis=0), _coldot(wl, lev), _coldot(wl, xt)
        if step is None:
            best = _wsse(scale, the_min, sw, swx, swx2, sl, sl2, sxl)
            continue
        det = sw * sl2 - sl * sl
        ok = det > 0
        det[~ok] = 1
        s, m = (sw * sxl - swx * sl) / det, (sl2 * swx - sl * sxl) / det
        pos = m > 0  # a positive offset is clamped to zero and the scale refit alone
        s[pos], m[pos] = sxl[pos] / sl2[pos], 0
        err = _wsse(s, m, sw, swx, swx2, sl, sl2, sxl)
        assert best is not None  # set by the first step
        better = ok & (err < best)
        best[better], scale[better], the_min[better] = err[better], s[better], m[better]
    scale[flat] = 0
    return scale.astype(np.float32), (-the_min).astype(np.float32)


def _wsse(s: np.ndarray, m: np.ndarray, sw: np.ndarray, swx: np.ndarray, swx2: np.ndarray,
          sl: np.ndarray, sl2: np.ndarray, sxl: np.ndarray) -> np.ndarray:
    """sum w (s*L + m - x)^2 expanded into weighted sums: no second pass over the values."""
    return s * s * sl2 + 2 * s * m * sl + m * m * sw - 2 * s * sxl - 2 * m * swx + swx2


def _q45_k(blocks: np.ndarray, qtype: QT, steps: tuple[int, ...]) -> np.ndarray:
    """Q4_K / Q5_K super-blocks: fp16 d, fp16 dmin, 12 B of 6-bit (sc, m), [qh,] nibbles."""
    nmax, rmin, rdelta = QKX2[qtype]
    n = blocks.shape[0]
    xt = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)
    scale, mins = _fit_scale_min(xt, nmax, rmin, rdelta, steps)
    scale, mins = scale.reshape(n, 8), mins.reshape(n, 8)
    max_s, max_m = scale.max(axis=1) + 0.0, mins.max(axis=1) + 0.0  # + 0.0: no -0 in d/dmin
    inv_s = 63 / np.where(max_s > 0, max_s, np.inf)  # 0 where the block has no scale
    inv_m = 63 / np.where(max_m > 0, max_m, np.inf)
    ls = np.clip(np.rint(scale * inv_s[:, None]), 0, 63).astype(np.uint8)
    lm = np.clip(np.rint(mins * inv_m[:, None]), 0, 63).astype(np.uint8)
    d_b, d = _fp16(max_s / 63)
    dmin_b, dmin = _fp16(max_m / 63)
    # requantize against the scales as stored; a zero sub-scale leaves only the offset
    dq, dm = (d[:, None] * ls).reshape(-1), (dmin[:, None] * lm).reshape(-1)
    lev = np.add(xt, dm)
    lev /= np.where(dq > 0, dq, np.inf)
    np.clip(np.rint(lev, out=lev), 0, nmax, out=lev)
    q = lev.astype(np.uint8).T.reshape(n, 4, 2, 32)  # [64-value chunk, sub-block, value]
    sc = np.empty((n, 12), dtype=np.uint8)
    sc[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    sc[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    sc[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    qs = ((q[:, :, 0] & 0xF) | ((q[:, :, 1] & 0xF) << 4)).reshape(n, 128)
    parts = [d_b, dmin_b, sc]
    if qtype == QT.Q5_K:  # fifth bit of sub-block s's value l is bit s of qh[l]
        hi = q.reshape(n, 8, 32) >> 4
        qh = np.zeros((n, 32), dtype=np.uint8)
        for s in range(8):
            qh |= hi[:, s] << s
        parts.append(qh)
    parts.append(qs)
    return np.concatenate(parts, axis=1)


def _fit_symmetric(xt: np.ndarray, steps: tuple[int, ...]) -> np.ndarray:
    """make_qx_quants(nmax=32, rmse_type=1) on groups xt [16, m]: the weighted LS scale."""
    hi, lo = xt.max(axis=0), xt.min(axis=0)
    mx = np.where(-lo > hi, lo, hi)  # signed value of largest magnitude
    zero = np.abs(mx) < GROUP_MAX_EPS
    inv = -32 / np.where(zero, np.inf, mx)
    w = xt * xt
    wx = w * xt
    lev = np.empty_like(xt)
    scale: np.ndarray | None = None
    best: np.ndarray | None = None
    for step in (0, *steps):
        np.multiply(xt, (inv * np.float32((32 + 0.1 * step) / 32)).astype(np.float32), out=lev)
        np.clip(np.rint(lev, out=lev), -32, 31, out=lev)
        slx, sl2 = _coldot(wx, lev), _coldot(w * lev, lev)
        s = slx / np.where(sl2 > 0, sl2, 1)
        if scale is None:
            scale, best = s, s * slx
            continue
        assert best is not None
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale[better], best[better] = s[better], (s * slx)[better]
    assert scale is not None  # the first step always runs
    scale[zero] = 0
    return scale.astype(np.float32)


def _q6_k(blocks: np.ndarray, steps: tuple[int, ...]) -> np.ndarray:
    """Q6_K super-blocks: 128 B low nibbles, 64 B high 2-bit pairs, 16 int8 scales, fp16 d."""
    n = blocks.shape[0]
    xt = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)
    scale = _fit_symmetric(xt, steps).reshape(n, 16)
    max_s = scale[np.arange(n), np.abs(scale).argmax(axis=1)]
    empty = np.abs(max_s) < GROUP_MAX_EPS
    inv = -128 / np.where(empty, np.inf, max_s)  # 0 for an all-zero block
    d_b, d = _fp16(-max_s / 128 + 0.0)  # an empty block stores d = +0
    sc = np.minimum(np.rint(scale * inv[:, None]), 127).astype(np.int8)
    dq = (d[:, None] * sc).reshape(-1)
    lev = xt / np.where(dq != 0, dq, np.inf)
    np.clip(np.rint(lev, out=lev), -32, 31, out=lev)
    lev += 32
    q = lev.astype(np.uint8).T.reshape(n, 2, 4, 32)  # [128-value half, k, l]
    ql = np.concatenate([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4),
                         (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], axis=2)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), d_b], axis=1)
    out[empty] = 0  # as llama.cpp: an all-zero block is all zero bytes
    return out
