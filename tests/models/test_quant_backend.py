"""The quantized-weight backend is chosen once per model, from the device and what builds."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models import quant_kernels
from llama_mpi.models.quant_backend import NativeCPUBackend, TorchBackend, choose_backend


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
