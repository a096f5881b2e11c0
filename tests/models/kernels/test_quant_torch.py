"""The torch dequantizers against gguf-py's numpy ones on the same bytes.

Equality is exact in float32 (``torch.equal``, no tolerance): every scale * quant product is
exact in fp32 and the one rounding (adding the min term) happens in the same order. bf16 output
must equal the float32 result rounded once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from llama_mpi.models.kernels import quant_torch
from llama_mpi.models.kernels.quant_torch import SUPPORTED, dequantize

QT = GGMLQuantizationType
LEGACY = [QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1]  # gguf-py can quantize these
K_QUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K]  # it cannot quantize these: random blocks instead
ALL = LEGACY + K_QUANTS
# byte offsets of the fp16 scale fields in one block (the only bytes that can decode to inf/nan)
FP16_FIELDS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q5_0: (0,), QT.Q5_1: (0, 2),
               QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,)}


def random_blocks(qtype: GGMLQuantizationType, shape: tuple[int, ...], K: int,
                  seed: int) -> np.ndarray:
    """uint8 [*shape, row_bytes] of random blocks whose fp16 fields hold finite scales; any
    other byte pattern is a valid block, so this covers every quant/scale bit."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(*shape, K // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        n = data[..., off].shape
        scale = rng.uniform(0.5, 2.0, n) * 2.0 ** rng.integers(-16, -2, n) * rng.choice([-1, 1], n)
        data[..., off:off + 2] = scale.astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(*shape, -1)


def quantized(qtype: GGMLQuantizationType, shape: tuple[int, ...], K: int,
              seed: int) -> np.ndarray:
    """Real quantized weights where gguf-py can make them, else random blocks."""
    if qtype in K_QUANTS:
        return random_blocks(qtype, shape, K, seed)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((*shape, K)).astype(np.float32) * 0.05
    return gguf_quants.quantize(w, qtype)


def reference(data: np.ndarray, qtype: GGMLQuantizationType) -> torch.Tensor:
    return torch.from_numpy(gguf_quants.dequantize(np.ascontiguousarray(data), qtype))


def test_supported_is_the_listed_types():
    assert SUPPORTED == frozenset(ALL)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("make", [quantized, random_blocks], ids=["quantized", "random"])
def test_matches_gguf_exactly_in_float32(qtype, make):
    K = 1024 if qtype in K_QUANTS else 1408  # 1408 = V2-Lite expert ffn, 44 blocks of 32
    data = make(qtype, (37,), K, seed=qtype.value)
    got = dequantize(torch.from_numpy(data), qtype, K, dtype=torch.float32)
    want = reference(data, qtype)
    assert got.dtype == torch.float32 and got.shape == (37, K)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_expert_stack_leading_dims(qtype):
    K = 512
    data = random_blocks(qtype, (3, 5, 4), K, seed=100 + qtype.value)  # [experts, rows, ...]
    got = dequantize(torch.from_numpy(data), qtype, K, dtype=torch.float32)
    assert got.shape == (3, 5, 4, K)
    assert torch.equal(got, reference(data, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_strided_block_aligned_column_slice(qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    K_wide, first, n = 6 * 256, 2, 3  # blocks [2, 5) of a 6-block-wide (K-quant) row
    if block == 32:
        first, n = 13, 11
    data = random_blocks(qtype, (4, 9), K_wide, seed=200 + qtype.value)
    wide = torch.from_numpy(data)
    view = wide[:, 1::2, first * size:(first + n) * size]  # strided rows and columns
    assert not view.is_contiguous()
    got = dequantize(view, qtype, n * block, dtype=torch.float32)
    assert torch.equal(got, reference(view.numpy(), qtype))
    assert torch.equal(got, dequantize(wide, qtype, K_wide, torch.float32)[:, 1::2,
                                                                         first * block:
                                                                         (first + n) * block])


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_cpu_chunking_of_large_strided_stacks(qtype, monkeypatch):
    """Large CPU inputs are expanded a few rows at a time: same values, shape and dtype."""
    block, size = GGML_QUANT_SIZES[qtype]
    K = 2 * 256
    data = random_blocks(qtype, (3, 7, 4), K, seed=500 + qtype.value)
    view = torch.from_numpy(data)[:, ::2, :, size:]  # strided, one block dropped
    monkeypatch.setattr(quant_torch, "_CPU_CHUNK_ELEMS", 3 * (K - block))  # 3 rows a chunk
    got = dequantize(view, qtype, K - block, dtype=torch.float32)
    assert got.shape == (3, 4, 4, K - block)
    assert torch.equal(got, reference(view.numpy(), qtype))
    got16 = dequantize(view, qtype, K - block)
    assert torch.equal(got16, got.to(torch.bfloat16))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_odd_storage_offset(qtype):
    """A view starting at an odd byte address still reads its fp16 fields."""
    K = 256
    data = torch.from_numpy(random_blocks(qtype, (3,), K, seed=300 + qtype.value))
    buf = torch.zeros(data.numel() + 1, dtype=torch.uint8)
    buf[1:] = data.flatten()
    view = buf[1:].view(3, -1)
    assert view.storage_offset() == 1
    assert torch.equal(dequantize(view, qtype, K, torch.float32), reference(data.numpy(), qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_bf16_output_is_float32_rounded_once(qtype):
    K = 512
    data = quantized(qtype, (6,), K, seed=400 + qtype.value)
    got = dequantize(torch.from_numpy(data), qtype, K)  # default dtype
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, reference(data, qtype).to(torch.bfloat16))


def test_unsupported_type_names_it():
    raw = torch.zeros(2, 18, dtype=torch.uint8)
    for qtype in (QT.IQ4_NL, QT.Q2_K, QT.F32):
        with pytest.raises(ValueError, match=qtype.name):
            dequantize(raw, qtype, 32)


def test_bad_shapes_are_value_errors():
    with pytest.raises(ValueError, match="multiple of the block size"):
        dequantize(torch.zeros(2, 34, dtype=torch.uint8), QT.Q8_0, 33)
    with pytest.raises(ValueError, match="68 bytes per row"):
        dequantize(torch.zeros(2, 34, dtype=torch.uint8), QT.Q8_0, 64)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(2, 34, dtype=torch.int8), QT.Q8_0, 32)


def test_plain_int_type_is_accepted():
    data = random_blocks(QT.Q6_K, (2,), 256, seed=7)
    got = dequantize(torch.from_numpy(data), int(QT.Q6_K), 256, torch.float32)
    assert torch.equal(got, reference(data, QT.Q6_K))


def test_meta_tensors_give_shapes_without_data():
    """Plain torch ops only: the meta device (no data, no host reads) goes through."""
    for qtype in ALL:
        block, size = GGML_QUANT_SIZES[qtype]
        raw = torch.empty(2, 3, 4 * size, dtype=torch.uint8, device="meta")
        out = quant_torch.dequantize(raw, qtype, 4 * block)
        assert out.shape == (2, 3, 4 * block) and out.device.type == "meta"
