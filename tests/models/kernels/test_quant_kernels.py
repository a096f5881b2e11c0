"""quant_kernels against gguf's reference dequantizers and float64 matmuls.

Tolerances, derived:

(a) Against ``dequantize(W) @ act.dequantize().T`` in float64 (the very values the kernel
    multiplies) only float32 rounding separates the results: integer dot products are exact,
    and each term passes through at most ``n = nch + 7`` float32 roundings (scale product,
    FMA per 512-value chunk, the 16-lane reduction, the output). So
    ``|err| <= 2 n 2^-24 * mag`` with ``mag`` the sum of |term| magnitudes: ``|x| @ |w|`` for
    the symmetric types; for the types with a separate min term (Q5_1, Q4_K, Q5_K) the scale
    and min parts can cancel, so ``mag = |x| @ (|w - mn| + |mn|)`` (mn = the weight's min
    term, got by dequantizing the blocks with all quant bits cleared). bf16 output adds its
    rounding, 2^-9 relative (2^-8 allowed).
(b) Against the plain float64 product ``dequantize(W) @ x.T``, the extra error is the 8-bit
    activation quantization: each value moves by at most d/2 = amax/254 of its 32-value
    block, so rigorously ``|err| <= sum_k |w_k| amax_b(k) / 254`` (+ (a)). Statistically
    (uniform rounding errors e_k, uncorrelated with x and w): err RMS / output RMS =
    rms(e) / rms(x) = rms(amax) / (127 sqrt 12) ~ 0.48 % for blocks of 32 standard Gaussians
    (rms(amax) ~ 2.1). All outputs of an activation row share its e, so one test's ratio
    does not average out (measured 0.58-0.76 % over these cases): we require <= 1.2 %, and a
    max abs error <= 5 % of the output RMS (measured <= 3.2 %).
"""

from __future__ import annotations

import functools

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from llama_mpi.models.kernels import cpu_kernels
from llama_mpi.models.kernels import quant_kernels as qk

TYPES = sorted(qk.SUPPORTED)
ASYM = {QT.Q5_1: (4, 24), QT.Q4_K: (16, 144), QT.Q5_K: (16, 176)}  # quant byte range
CHUNK = {t: 256 if t is QT.Q6_K else 512 for t in TYPES}


@pytest.fixture(scope="module", autouse=True)
def lib():
    if not qk.available():
        pytest.skip("quantized-weight kernels unavailable here (need AVX512-BF16/VNNI, a C "
                    "compiler, LLAMA_MPI_NO_KERNELS unset)")
    return cpu_kernels.kernel()


def k_values(qt: QT) -> list[int]:
    """1408 = 44 blocks of 32: rows that end in a partial chunk of 16 groups."""
    return [256, 1408, 2048] if GGML_QUANT_SIZES[qt][0] == 32 else [256, 2048]


@functools.cache
def weights(qt: QT, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Raw blocks [N, row_bytes]: gguf's own quantizer where it has one; for the K-quants
    random bytes (every pattern is a valid block) with sane fp16 d (and dmin)."""
    rng = np.random.default_rng([int(qt), N, K, seed])
    block, size = GGML_QUANT_SIZES[qt]
    if qt in (QT.Q4_K, QT.Q5_K, QT.Q6_K):
        raw = rng.integers(0, 256, size=(N, K // block, size), dtype=np.uint8)
        d = rng.uniform(0.01, 0.05, size=(N, K // block, 2)).astype(np.float16)
        d = d.view(np.uint8).reshape(N, K // block, 4)
        if qt is QT.Q6_K:
            raw[..., 208:210] = d[..., :2]
        else:
            raw[..., 0:4] = d
        return raw.reshape(N, -1)
    return gguf.quants.quantize(rng.standard_normal((N, K)).astype(np.float32), qt)


def dequant(qt: QT, raw: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(raw), qt).astype(np.float64)


def magnitude_weights(qt: QT, raw: np.ndarray) -> np.ndarray:
    """|w| per value, or |w - mn| + |mn| where a separate min term can cancel (see (a))."""
    w = dequant(qt, raw)
    if qt not in ASYM:
        return np.abs(w)
    lo, hi = ASYM[qt]
    block, size = GGML_QUANT_SIZES[qt]
    blocks = np.ascontiguousarray(raw).reshape(raw.shape[0], -1, size).copy()
    blocks[..., lo:hi] = 0  # every quant 0: the value is the min term alone
    mn = dequant(qt, blocks.reshape(raw.shape[0], -1))
    return np.abs(w - mn) + np.abs(mn)


def activations(M: int, K: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(M, K, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check_product(qt: QT, raw: np.ndarray, x: torch.Tensor, act: qk.QuantizedActivations,
                  y: torch.Tensor) -> None:
    """y [M, N] against (a) and (b) of the module docstring."""
    K = x.shape[1]
    w = dequant(qt, raw)
    xq = act.dequantize().double().numpy()
    got = y.double().numpy()
    n = -(-K // CHUNK[qt]) + 7
    mag = np.abs(xq) @ magnitude_weights(qt, raw).T
    ref_a = xq @ w.T
    tol_a = 2 * n * 2.0**-24 * mag + 1e-30
    if y.dtype is torch.bfloat16:
        tol_a = tol_a + 2.0**-8 * np.abs(ref_a)
    err_a = np.abs(got - ref_a)
    assert (err_a <= tol_a).all(), f"(a) worst excess {np.max(err_a / tol_a):.3g}x"

    xf = x.double().numpy()
    ref_b = xf @ w.T
    half_step = np.repeat(np.abs(xf).reshape(x.shape[0], -1, 32).max(-1) / 254, 32, axis=1)
    tol_b = half_step @ np.abs(w).T * (1 + 1e-6) + tol_a
    err_b = np.abs(got - ref_b)
    assert (err_b <= tol_b).all(), f"(b) worst excess {np.max(err_b / tol_b):.3g}x"
    rms = np.sqrt(np.mean(ref_b**2))
    assert np.sqrt(np.mean(err_b**2)) <= 0.012 * rms
    assert err_b.max() <= 0.05 * rms


def test_quantize_activations():
    K = 256
    x = activations(5, K, seed=1)
    x[2] = 0.0  # an all-zero row: d = 0, q = 0
    x[3, :32] = 1e-35  # a block too small to scale: taken as zero
    for dt in (torch.float32, torch.bfloat16):
        xi = x.to(dt)
        act = qk.quantize_activations(xi)
        assert act.q.dtype is torch.int8 and act.q.shape == (5, K)
        assert int(act.q.abs().max()) <= 127
        assert torch.equal(act.sums, act.q.int().view(5, -1, 16).sum(-1, dtype=torch.int32))
        amax = xi.float().abs().view(5, -1, 32).amax(-1)
        torch.testing.assert_close(act.d[amax >= 1e-30], (amax / 127)[amax >= 1e-30])
        assert (act.d[2] == 0).all() and (act.q[2] == 0).all() and act.d[3, 0] == 0
        err = (act.dequantize() - xi.float()).abs().view(5, -1, 32)
        assert (err <= act.d[..., None] * (0.5 + 1e-5) + 1e-30).all()  # 1e-35: zeroed


@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("qt,K", [(t, k) for t in TYPES for k in k_values(t)],
                         ids=lambda v: v.name if isinstance(v, QT) else str(v))
def test_matmul(qt, K, M):
    N = 37 if M % 2 else 130  # odd and even row counts, neither a multiple of 4 or 64
    raw = weights(qt, N, K)
    x = activations(M, K, seed=M * 7 + K)
    act = qk.quantize_activations(x)
    for out_dtype in (torch.float32, torch.bfloat16):
        y = qk.matmul(qt, torch.from_numpy(raw), K, act, out_dtype=out_dtype)
        assert y.dtype is out_dtype and y.shape == (M, N)
        check_product(qt, raw, x, act, y)
    # raw activations are quantized on the way in: the same result
    assert torch.equal(qk.matmul(qt, torch.from_numpy(raw), K, x), y)


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_bf16_input_and_strided_rows_and_output(qt):
    """A block-aligned column slice of a wider tensor, bf16 activations, output written into
    a wider buffer."""
    block, size = GGML_QUANT_SIZES[qt]
    K, extra = 2048, 512  # the slice starts 256 values in, the full rows are 2560 long
    wide = weights(qt, 37, K + extra, seed=3)
    b0 = 256 // block * size
    view = torch.from_numpy(wide)[:, b0:b0 + K // block * size]
    assert view.stride(0) == wide.shape[1]
    x = activations(3, K, seed=5, dtype=torch.bfloat16)
    act = qk.quantize_activations(x)
    buf = torch.full((3, 50), float("nan"), dtype=torch.bfloat16)
    y = qk.matmul(qt, view, K, act, out=buf[:, 6:43])
    assert y.data_ptr() == buf[:, 6:].data_ptr()
    assert buf[:, :6].isnan().all() and buf[:, 43:].isnan().all()
    check_product(qt, view.numpy(), x.float(), act, buf[:, 6:43])


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_grouped_matmul(qt):
    """Routed experts: repeated experts, a 16-row group, an empty group, two calls writing
    the two halves of one buffer (gate | up), a column-sliced expert tensor."""
    block, size = GGML_QUANT_SIZES[qt]
    E, N, K = 4, 70, k_values(qt)[-1]
    gate = np.stack([weights(qt, N, K, seed=10 + e) for e in range(E)])
    up_wide = np.stack([weights(qt, N, K + 256, seed=20 + e) for e in range(E)])
    up = torch.from_numpy(up_wide)[:, :, 256 // block * size:]
    idx, counts = [2, 0, 2, 3, 1, 3], [1, 3, 16, 0, 2, 5]
    R = sum(counts)
    x = activations(R, K, seed=11)
    act = qk.quantize_activations(x)
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.full((R, 2 * N), float("nan"), dtype=dtype)
        qk.grouped_matmul(qt, torch.from_numpy(gate), K, act, idx, counts, y[:, :N])
        qk.grouped_matmul(qt, up, K, x, idx, counts, y[:, N:])
        assert not y.isnan().any()
        r = 0
        for e, c in zip(idx, counts, strict=True):
            if c:
                rows = slice(r, r + c)
                sub = qk.QuantizedActivations(act.q[rows], act.d[rows], act.sums[rows])
                check_product(qt, gate[e], x[rows], sub, y[rows, :N])
                check_product(qt, up[e].numpy(), x[rows], sub, y[rows, N:])
            r += c


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_rows(qt):
    block, size = GGML_QUANT_SIZES[qt]
    K = k_values(qt)[1]
    raw = weights(qt, 37, K + block, seed=4)
    view = torch.from_numpy(raw)[:, size:]  # strided: skip each row's first block
    want = gguf.quants.dequantize(np.ascontiguousarray(view.numpy()), qt)  # float32
    got = qk.dequantize_rows(qt, view, K, dtype=torch.float32)
    assert torch.equal(got, torch.from_numpy(want))  # exact: one rounding, as the reference
    assert torch.equal(qk.dequantize_rows(qt, view, K), torch.from_numpy(want).bfloat16())
    rows = [36, 0, 5, 5, 17]
    assert torch.equal(qk.dequantize_rows(qt, view, K, rows, torch.float32),
                       torch.from_numpy(want[rows]))
    assert qk.dequantize_rows(qt, view, K, []).shape == (0, K)
    with pytest.raises(IndexError):
        qk.dequantize_rows(qt, view, K, [37])


def test_unsupported_types_are_refused(lib):
    w = torch.zeros(4, 144, dtype=torch.uint8)
    x = torch.randn(1, 256)
    for bad in (QT.Q2_K, QT.IQ4_NL, QT.BF16):
        with pytest.raises(ValueError, match="not supported"):
            qk.matmul(bad, w, 256, x)
        with pytest.raises(ValueError, match="not supported"):
            qk.dequantize_rows(bad, w, 256)
    with pytest.raises(ValueError, match="unknown GGML quantization type"):
        qk.matmul(999, w, 256, x)
    # the C entry points themselves return an error code for an unknown type
    act = qk.quantize_activations(x)
    y = torch.empty(1, 4)
    assert lib.quant_matmul(int(QT.Q2_K), w.data_ptr(), 144, act.q.data_ptr(), act.d.data_ptr(),
                            act.sums.data_ptr(), y.data_ptr(), 4, 0, 1, 4, 256, 1) == -1
    assert lib.quant_dequant_rows(99, w.data_ptr(), 144, None, 4, 256, y.data_ptr(), 0, 1) == -1


def test_bad_shapes_are_refused():
    raw = torch.from_numpy(weights(QT.Q8_0, 8, 256))
    with pytest.raises(ValueError, match="1..16 activation rows"):
        qk.matmul(QT.Q8_0, raw, 256, torch.randn(17, 256))
    with pytest.raises(ValueError, match="activations have K=512"):
        qk.matmul(QT.Q8_0, raw, 256, torch.randn(1, 512))
    with pytest.raises(ValueError, match="not a positive multiple"):
        qk.matmul(QT.Q4_K, raw, 288, torch.randn(1, 288))
    with pytest.raises(ValueError, match="contiguous bytes"):
        qk.matmul(QT.Q8_0, raw[:, :100], 256, torch.randn(1, 256))
    w3 = raw.view(2, 4, -1)
    out = torch.empty(17, 4)
    with pytest.raises(ValueError, match="count"):
        qk.grouped_matmul(QT.Q8_0, w3, 256, torch.randn(17, 256), [0], [17], out)
    with pytest.raises(ValueError, match="out of range"):
        qk.grouped_matmul(QT.Q8_0, w3, 256, torch.randn(2, 256), [2], [2], out[:2])
