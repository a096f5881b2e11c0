"""The MoE combine (weighted scatter-add of expert outputs) against float64 sums."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models.kernels.cpu_kernels import kernel
from llama_mpi.moe.combine import weighted_scatter_add


def reference(out, rows, y, w):
    want = out.double().clone()
    for p in range(len(rows)):
        want[rows[p]] += w[p].double() * y[p].double()
    return want


@pytest.mark.parametrize("width", [2048, 37])  # 37: not a multiple of the vector width
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_scatter_add_matches_float64(width, dtype):
    if dtype is torch.bfloat16 and kernel() is None:
        pytest.skip("no AVX512-BF16 CPU or no C compiler: bf16 also takes the torch path")
    gen = torch.Generator().manual_seed(width)
    out = torch.randn(5, width, generator=gen)
    rows = torch.tensor([3, 0, 3, 4, 3, 1])  # token 3 gets three experts' outputs
    y = torch.randn(6, width, generator=gen).to(dtype)
    w = torch.rand(6, generator=gen)
    want = reference(out, rows, y, w)
    got = weighted_scatter_add(out, rows, y, w)
    assert got is out and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
