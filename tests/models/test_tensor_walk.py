"""``iter_weights`` reaches every weight; ``check_finite`` (``check_tensors``) finds a NaN
anywhere, routed experts included, in dense and quantized files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from llama_mpi.models.gguf.builder import build_model
from llama_mpi.models.loader import load_model
from llama_mpi.models.tensor_walk import check_finite, iter_weights

EXPERTS = "blk.1.ffn_up_exps.weight"  # tiny: layer 0 is dense, 1.. are MoE


def plant_nan(path: Path, name: str) -> None:
    """Write a NaN into tensor ``name`` of the file in place (its first value or block)."""
    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == name)
    data = tensor.data
    if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
        data.reshape(-1)[0] = np.nan
    elif tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        data.reshape(-1)[:2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)  # scale d
    else:
        raise AssertionError(f"plant_nan: no rule for {tensor.tensor_type.name}")
    data.flush() if hasattr(data, "flush") else reader.data.flush()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("walk")
    return {ft: build_model(d / f"tiny-{ft}.gguf", preset="tiny", ftype=ft, seed=3)
            for ft in ("f32", "q8_0")}


def test_the_walk_reaches_every_tensor_of_the_file(files) -> None:
    path = files["f32"]
    in_file = sum(int(np.prod(t.shape)) for t in gguf.GGUFReader(path).tensors)
    model = load_model(path, quant_backend="torch")
    walked = dict(iter_weights(model))
    weights = {p: w for p, w in walked.items() if not p.startswith("rope")}
    assert sum(w.numel() for w in weights.values()) == in_file
    for part in ("experts.gate_up", "experts.down", "router", "shared", "embed", "head", "norm"):
        assert any(part in p for p in weights), (part, sorted(weights)[:20])


@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_a_nan_in_a_routed_expert_is_found_and_named(files, tmp_path, ftype) -> None:
    bad = tmp_path / f"nan-{ftype}.gguf"
    bad.write_bytes(files[ftype].read_bytes())
    plant_nan(bad, EXPERTS)
    assert check_finite(load_model(files[ftype], quant_backend="torch")) > 0
    with pytest.raises(ValueError, match=r"check_tensors: blocks\.1\.ffn\.experts\.gate_up "
                       r"holds NaN or inf values"):
        check_finite(load_model(bad, quant_backend="torch"))
