"""Our model on a converted GGUF gives transformers' DeepseekV2 logits, in every mode."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models.loader import load_model

from .conftest import SEQS, batch_for, num_blocks
from .hf_reference import hf_logits, load_dequantized

F32_TOL = 1e-4


def run_all(path, seqs, **opts) -> list[torch.Tensor]:
    """Prefill every sequence in one batch; return each sequence's logits at all positions."""
    model = load_model(path, **opts)
    pool = model.make_kv_pool(num_blocks(seqs), 4)
    out = model(batch_for(seqs), pool)
    return list(out.split([len(s) for s in seqs]))


@pytest.mark.parametrize("variant", ["lite", "full"])
@pytest.mark.parametrize("layout", ["mla", "legacy"])
@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "naive"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "loop"])
def test_float32_logits_match_transformers(reference, variant, layout, absorbed, fused):
    hf, path = reference(variant, "f32", layout)
    ours = run_all(path, SEQS, dtype="float32", absorbed_mla=absorbed, fused_moe=fused)
    for ids, got in zip(SEQS, ours, strict=True):
        want = hf_logits(hf, ids)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= F32_TOL
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("ftype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("variant", ["lite", "full"])
def test_quantized_file_matches_transformers_on_dequantized_weights(reference, variant, ftype):
    hf, path = reference(variant, ftype, "mla")
    deq = type(hf)(hf.config).eval()
    load_dequantized(deq, path)
    # dense at load: exact float32 (the C kernels' bounds: test_quant_parity.py)
    ours = run_all(path, SEQS, dtype="float32", quant_backend="dequantize")
    for ids, got in zip(SEQS, ours, strict=True):
        want = hf_logits(deq, ids)
        assert (got - want).abs().max().item() <= F32_TOL
        assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("variant", ["lite", "full"])
@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "naive"])
def test_bfloat16_argmax_agrees_with_transformers(reference, variant, absorbed):
    hf, path = reference(variant, "bf16", "mla")
    deq = type(hf)(hf.config).eval()
    load_dequantized(deq, path)  # the same bf16-rounded weights, run in float32
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 320, (n,), generator=gen).tolist() for n in (64, 48, 40, 33)]
    ours = run_all(path, seqs, dtype="auto", absorbed_mla=absorbed)
    assert ours[0].dtype == torch.float32  # logits are returned in float32
    agree = total = 0
    for ids, got in zip(seqs, ours, strict=True):
        want = hf_logits(deq, ids)
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        total += len(ids)
    assert agree / total >= 0.97
