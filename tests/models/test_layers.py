"""Layer pieces (C kernels where they build, else torch) against transformers / torch:
RMSNorm against DeepseekV2RMSNorm, the SwiGLU activation against F.silu(gate) * up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

from llama_mpi.models.layers import rms_norm, silu_mul


def hf_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = DeepseekV2RMSNorm(x.shape[-1], eps=eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


@pytest.mark.parametrize("rows,width", [(1, 2048), (5, 512), (300, 2048), (3, 37)])
def test_bf16_rows_match_transformers(rows, width):
    gen = torch.Generator().manual_seed(rows * width)
    weight = torch.randn(width, generator=gen).to(torch.bfloat16)
    wide = (torch.randn(rows, width + 64, generator=gen) * 3).to(torch.bfloat16)
    x = wide[:, :width]  # strided rows, as a slice of a wider projection output
    got, want = rms_norm(x, weight, 1e-6), hf_norm(x, weight, 1e-6)
    assert got.dtype == torch.bfloat16
    # summation order may flip the last bit of a rare element (one bf16 step: 2^-7..2^-6)
    assert (got != want).float().mean().item() <= 1e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-6)


def test_float32_residual_rounds_like_a_bf16_input():
    """The float32 residual stream is normalised in float32 and rounded to bf16 before the
    weight, i.e. transformers' norm of the residual followed by the model dtype."""
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(2048, generator=gen).to(torch.bfloat16)
    x = torch.randn(4, 2048, generator=gen) * 5
    got = rms_norm(x, weight, 1e-6)
    hs = hf_norm(x, weight.float(), 1e-6) / weight.float()  # transformers' normalised x
    want = weight * hs.to(torch.bfloat16)
    assert (got != want).float().mean().item() <= 1e-3


@pytest.mark.parametrize("rows,width", [(1, 1408), (9, 2816), (3, 37)])
def test_silu_mul_matches_torch_bf16(rows, width):
    gen = torch.Generator().manual_seed(rows + width)
    gate_up = (torch.randn(rows, 2 * width, generator=gen) * 4).to(torch.bfloat16)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate) * up  # bf16: silu rounded, then the product rounded
    got = silu_mul(gate_up)
    assert got.shape == (rows, width) and got.dtype == torch.bfloat16
    assert (got != want).float().mean().item() <= 1e-3  # exp may differ in its last bit
    torch.testing.assert_close(got.float(), want.float(), rtol=2**-6, atol=1e-6)
