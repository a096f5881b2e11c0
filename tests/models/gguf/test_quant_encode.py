"""quant_encode.quantize against gguf-py's own dequantizers (and llama.cpp's reference
quantizers when a llama.cpp build is around).

Error bounds are RMS errors relative to the input's RMS on N(0, 1) rows, with ~5 % margin over
what was measured. For comparison, llama.cpp's quantize_row_*_ref gives 0.0713 (Q4_K), 0.0361
(Q5_K), 0.0177 (Q6_K) on the same kind of data; gguf-py's 32-block types are llama.cpp's.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from llama_mpi.models.gguf.quant_encode import quantize

QT = gguf.GGMLQuantizationType
K_QUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, *K_QUANTS]
RMS_BOUND = {QT.Q8_0: 0.0058, QT.Q4_0: 0.090, QT.Q5_0: 0.045, QT.Q5_1: 0.040,
             QT.Q4_K: 0.0755, QT.Q5_K: 0.0382, QT.Q6_K: 0.0187}
# a llama.cpp build's libggml-base exports quantize_row_q{4,5,6}_K_ref
LIBGGML = Path(os.environ.get(
    "LLAMA_CPP_LIBGGML",
    "/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/libggml-base.so"))


def gaussian(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def decode(data: np.ndarray, qtype: QT) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)


def rel_rms(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - x) ** 2) / np.mean(x**2)))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_shape_and_byte_size(qtype):
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    out = quantize(gaussian(3, 2, 512), qtype)
    assert out.dtype == np.uint8
    assert out.shape == (3, 2, 512 // block * nbytes)
    assert out.shape == gguf.quants.quant_shape_to_byte_shape((3, 2, 512), qtype)


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_round_trip_error_relative_to_rms(qtype):
    x = gaussian(64, 2048) * np.float32(0.02)  # linear-weight scale: the error is relative
    y = decode(quantize(x, qtype), qtype)
    assert y.shape == x.shape
    assert rel_rms(y, x) <= RMS_BOUND[qtype]


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quants_follow_uneven_groups(qtype):
    """Sub-block scales: groups 1000x apart in size within one super-block, and offsets."""
    x = gaussian(16, 1024, seed=1).reshape(-1, 32)
    x *= np.float32(10.0) ** np.random.default_rng(2).uniform(-3, 0, (x.shape[0], 1))
    x[::3] += np.float32(0.5)  # all-positive groups: the min/offset path
    x = x.reshape(16, 1024)
    y = decode(quantize(x, qtype), qtype)
    # each group's error against the super-block's largest group: 6-bit sub-scales cannot do
    # better than 1/63 of the largest scale on the small ones
    err = np.abs(y - x).reshape(-1, 256).max(axis=1)
    top = np.abs(x).reshape(-1, 256).max(axis=1)
    assert (err <= top * {QT.Q4_K: 0.09, QT.Q5_K: 0.045, QT.Q6_K: 0.03}[qtype]).all()
    assert rel_rms(y, x) <= 2 * RMS_BOUND[qtype]


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_all_zero_blocks_decode_to_zero(qtype):
    x = np.zeros((2, 512), dtype=np.float32)
    x[1, 256:] = gaussian(256)  # a zero super-block next to a live one
    y = decode(quantize(x, qtype), qtype)
    assert (y[0] == 0).all() and (y[1, :256] == 0).all()
    if qtype in K_QUANTS:
        assert not quantize(np.zeros((1, 256), np.float32), qtype).any()


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
@pytest.mark.parametrize("value", [0.37, -2.5, 40.0])  # fp16-normal scales
def test_constant_blocks_decode_to_the_constant(qtype, value):
    x = np.full((2, 256), value, dtype=np.float32)
    y = decode(quantize(x, qtype), qtype)
    np.testing.assert_allclose(y, x, rtol=1e-3)  # fp16 scale rounding only


@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_k_quant_rows_must_be_multiples_of_256(qtype):
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize(gaussian(4, 1408), qtype)  # V2-Lite's expert down rows: llama.cpp falls back


def _llama_ref(x: np.ndarray, qtype: QT) -> np.ndarray:
    lib = ctypes.CDLL(str(LIBGGML))
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    out = np.zeros((x.size // 256, nbytes), dtype=np.uint8)
    x = np.ascontiguousarray(x, dtype=np.float32)
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p),
       ctypes.c_int64(x.size))
    return out


@pytest.mark.skipif(not LIBGGML.is_file(), reason=f"no llama.cpp build at {LIBGGML}")
@pytest.mark.parametrize("qtype", K_QUANTS, ids=lambda q: q.name)
def test_matches_llama_cpp_reference_quantizer(qtype):
    x = gaussian(64, 2048, seed=3) * np.float32(0.02)
    ref = _llama_ref(x, qtype)
    full = quantize(x, qtype, exhaustive=True).reshape(ref.shape)
    # same layout and search: identical super-blocks but for float near-ties
    assert (full == ref).all(axis=1).mean() >= 0.95
    fast_err = rel_rms(decode(quantize(x, qtype), qtype), x)
    ref_err = rel_rms(decode(ref, qtype).reshape(x.shape), x)
    assert fast_err <= 1.015 * ref_err
