"""The quantized-weight backend is chosen once per model, from the device and what builds."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models.kernels import quant_kernels
from llama_mpi.models.kernels.quant_backend import NativeCPUBackend, TorchBackend, choose_backend


def test_auto_uses_the_kernels_where_they_build(monkeypatch):
    monkeypatch.setattr(quant_kernels, "available", lambda: True)
    assert isinstance(choose_backend("auto", torch.device("cpu")), NativeCPUBackend)


def test_auto_falls_back_to_torch_without_kernels(monkeypatch):
    """A CPU without AVX512-VNNI or a compiler (or LLAMA_MPI_NO_KERNELS=1)."""
    monkeypatch.setattr(quant_kernels, "available", lambda: False)
    assert isinstance(choose_backend("auto", torch.device("cpu")), TorchBackend)
    with pytest.raises(ValueError, match="quant_backend: native needs the CPU kernels"):
        choose_backend("native", torch.device("cpu"))


def test_accelerators_dequantize_with_torch_and_dequantize_means_dense():
    assert isinstance(choose_backend("auto", torch.device("meta")), TorchBackend)
    assert choose_backend("dequantize", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="quant_backend must be one of"):
        choose_backend("fast", torch.device("cpu"))


@pytest.mark.skipif(not quant_kernels.available(),
                    reason="the C kernels need AVX512-VNNI/BF16 and a compiler")
def test_float16_compute_runs_through_float32_tiles(reference):
    """The kernels take float32 / bf16 activations; float16 (a dtype a user may ask for)
    takes the exactly dequantized tiles and matches the exact float32 result (dense at load)
    to float16 rounding."""
    from llama_mpi.models.loader import load_model
    from tests.models.conftest import SEQS, batch_for, num_blocks

    _, path = reference("quant", "q8_0", "mla")
    out = {}
    for dtype, backend in (("float16", "native"), ("float32", "dequantize")):
        model = load_model(path, dtype=dtype, quant_backend=backend)
        out[dtype] = model(batch_for(SEQS), model.make_kv_pool(num_blocks(SEQS), 4))
    rel = (out["float16"] - out["float32"]).norm() / out["float32"].norm()
    assert rel <= 0.02, rel  # measured 0.4 %
