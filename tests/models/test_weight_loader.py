"""Per-tensor loading: kept types stay mapped blocks, slices that cut blocks are dequantized
(and logged), other types are dequantized (and logged); errors name the file and tensor.
Values are checked against gguf-py's dequantizer on the same bytes."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from llama_mpi.models.gguf.gguf_file import GGUFError, GGUFFile
from llama_mpi.models.kernels import quant_kernels
from llama_mpi.models.kernels.quant_backend import TorchBackend
from llama_mpi.models.quant_weight import QuantWeight
from llama_mpi.models.shard import Shard
from llama_mpi.models.weight_loader import WeightPolicy, load_weight, stack_rows

QT = gguf.GGMLQuantizationType


def write(path: Path, tensors: dict[str, tuple[np.ndarray, QT]]) -> Path:
    w = gguf.GGUFWriter(path, "deepseek2")
    for name, (x, qt) in tensors.items():
        data = gguf.quants.quantize(x, qt)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def file(tmp_path_factory) -> tuple[GGUFFile, dict[str, np.ndarray]]:
    gen = np.random.default_rng(0)
    x = {"a": gen.standard_normal((48, 320), dtype=np.float32),
         "b": gen.standard_normal((4, 16, 96), dtype=np.float32),
         "c": gen.standard_normal((24, 64), dtype=np.float32)}
    path = write(tmp_path_factory.mktemp("w") / "t.gguf",
                 {"a.weight": (x["a"], QT.Q8_0), "b.weight": (x["b"], QT.Q5_0),
                  "c.weight": (x["c"], QT.Q4_1)})
    gf = GGUFFile(path)
    deq = {n: gguf.quants.dequantize(gf.blocks(gf.info(f"{n}.weight")).numpy(),
                                     gf.info(f"{n}.weight").qtype) for n in x}
    return gf, deq


def policy() -> WeightPolicy:
    return WeightPolicy(torch.float32, TorchBackend())


def test_kept_type_stays_mapped_blocks(file):
    gf, deq = file
    p = policy()
    w = load_weight(gf, "a.weight", p)
    assert isinstance(w, QuantWeight) and w.shape == (48, 320)
    assert p.mapped_bytes == gf.info("a.weight").nbytes and p.copied_bytes == 0
    assert torch.equal(w.dequantize(torch.float32), torch.from_numpy(deq["a"]))


def test_row_and_expert_slices_are_views(file):
    gf, deq = file
    w = load_weight(gf, "b.weight", policy(), start=1, stop=3)
    assert isinstance(w, QuantWeight) and w.shape == (2, 16, 96)
    assert torch.equal(w[1].dequantize(torch.float32), torch.from_numpy(deq["b"][2]))


def test_block_aligned_column_slice_is_a_strided_view(file):
    gf, deq = file
    w = load_weight(gf, "a.weight", policy(), dim=1, start=64, stop=256)
    assert isinstance(w, QuantWeight) and w.shape == (48, 192)
    assert w.parts[0].raw.stride(0) == gf.blocks(gf.info("a.weight")).stride(0)  # no copy
    x = torch.randn(3, 192)
    want = x.double() @ torch.from_numpy(deq["a"][:, 64:256]).double().T
    assert torch.allclose(w.matmul(x).double(), want, atol=1e-4)


def test_column_slice_inside_a_block_is_dequantized_and_logged(file, caplog):
    gf, deq = file
    p = policy()
    with caplog.at_level(logging.INFO, logger="llama_mpi.models.weight_loader"):
        w = load_weight(gf, "a.weight", p, dim=1, start=16, stop=160)
    assert isinstance(w, torch.Tensor) and torch.equal(w, torch.from_numpy(deq["a"][:, 16:160]))
    assert "a.weight: columns [16:160] cut its 32-element Q8_0 blocks" in caplog.text
    assert p.dequantized == ["a.weight"] and p.copied_bytes == w.numel() * 4


def test_other_types_are_dequantized_with_a_log_line(file, caplog):
    gf, deq = file
    with caplog.at_level(logging.INFO, logger="llama_mpi.models.weight_loader"):
        w = load_weight(gf, "c.weight", policy())
    assert isinstance(w, torch.Tensor) and torch.equal(w, torch.from_numpy(deq["c"]))
    assert "c.weight: Q4_1 is not computed on quantized" in caplog.text


def test_stacked_parts_multiply_as_one_matrix(file):
    gf, deq = file
    p = policy()
    a = load_weight(gf, "a.weight", p)
    top = load_weight(gf, "a.weight", p, start=0, stop=8)
    w = stack_rows(gf, [a, top], ["a.weight", "a.weight"], p)
    assert isinstance(w, QuantWeight) and w.shape == (56, 320)
    x = torch.randn(2, 320)
    dense = torch.from_numpy(np.concatenate([deq["a"], deq["a"][:8]]))
    assert torch.allclose(w.matmul(x), x @ dense.T, atol=1e-4)


@pytest.mark.parametrize("width,align,ranks", [(2816, 256, 2), (768, 256, 2), (10944, 32, 4),
                                               (768, 256, 4), (1408, 32, 4)])
def test_columns_split_between_blocks_where_it_can(width, align, ranks):
    parts = [Shard(tp_rank=r, tp_size=ranks).columns(width, align=align) for r in range(ranks)]
    assert parts[0][0] == 0 and parts[-1][1] == width
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))  # contiguous
    if width // align >= ranks:
        assert all(lo % align == 0 for lo, _ in parts)  # never inside a block
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) - min(sizes) <= align
    else:  # fewer blocks than ranks: even, and the loader dequantizes the cut slices
        assert len({hi - lo for lo, hi in parts}) == 1


def test_truncated_quantized_tensor_names_file_and_tensor(file, tmp_path):
    gf, _ = file
    data = gf.path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: gf.info("b.weight").offset + 10])
    with pytest.raises(GGUFError, match=r"cut\.gguf: tensor '[abc]\.weight' ends at byte \d+ "
                       r"but the file has \d+ bytes \(truncated file\)"):
        GGUFFile(cut)


@pytest.mark.skipif(not quant_kernels.available(),
                    reason="the C kernels need AVX512-VNNI/BF16 and a compiler")
@pytest.mark.parametrize("rows", [1, 16, 40, 200])  # one call, 16-row chunks, tiles + GEMM
def test_native_backend_paths_match_the_dequantized_product(file, rows):
    """Up to 128 rows the kernels (exact on their int8 activations), beyond dequantized tiles
    (exact on the float activations): both against float64 on gguf-py's dequantized values."""
    from llama_mpi.models.kernels.quant_backend import NativeCPUBackend

    gf, deq = file
    a = load_weight(gf, "a.weight", WeightPolicy(torch.float32, NativeCPUBackend()))
    w = QuantWeight.concat([a, a], "a|a")  # two parts: gate|up style
    x = torch.randn(rows, 320)
    dense = torch.from_numpy(np.concatenate([deq["a"], deq["a"]])).double()
    if rows <= NativeCPUBackend.CHUNKED_MAX_ROWS:
        x = torch.cat([quant_kernels.quantize_activations(x[r:r + 16]).dequantize()
                       for r in range(0, rows, 16)]).float()  # what the kernels multiply
    want = x.double() @ dense.T
    assert torch.allclose(w.matmul(x).double(), want, rtol=1e-4, atol=1e-4)
