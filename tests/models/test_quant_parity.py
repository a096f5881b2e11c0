"""Quantized files run on their own blocks and give transformers' logits on the same weights.

The reference is transformers' DeepseekV2 (float32) with every tensor dequantized by gguf-py
(``load_dequantized``): it sees exactly the weights we compute with. The ``quant`` variant has
rows of 256, so Q4_K / Q5_K / Q6_K apply, with V2-Lite's fallbacks (a 384-wide expert down
projection takes a 32-element type).

Tolerances (relative RMS error of all logits, and argmax agreement over the 38 positions):
- the torch and dequantize-at-load backends in float32 compute on exactly dequantized
  weights: float32 rounding (max abs 1e-4, every argmax);
- the C kernels (every product of up to 128 rows; beyond, exactly dequantized tiles and a
  GEMM) quantize each activation row to int8 per 32 values, as llama.cpp does for Q8_0 /
  Q4_0 / Q5_x (finer than its Q8_K for K-quants); the kernels are exact on those int8
  values (test_quant_kernels). Over 3 layers that is 2-5 % relative RMS per position
  (measured 3.1-6.6 % per run in float32), bound 8 %, >= 85 % argmax agreement;
- bf16 compute (``dtype: auto`` for quantized files) adds bf16 activations (3-4 % alone,
  the same on the torch path): bound 10 %, >= 80 % argmax agreement (this random model has
  near-ties).
"""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.kernels import quant_kernels
from llama_mpi.models.loader import load_model
from llama_mpi.models.quant_weight import QuantWeight

from .conftest import SEQS, batch_for, num_blocks
from .hf_reference import hf_logits, load_dequantized

F32_TOL = 1e-4
NATIVE_REL = {"float32": (0.08, 0.85), "auto": (0.10, 0.80),  # (rel RMS bound, agreement)
              "decode": (0.08, 0.85)}
FTYPES = ["q8_0", "q4_k_m", "q6_k", "q5_k_m", "q4_0"]  # every kept type appears in one
needs_kernels = pytest.mark.skipif(not quant_kernels.available(),
                                   reason="the C kernels need AVX512-VNNI/BF16 and a compiler")


def run_all(path, seqs, **opts) -> tuple[list[torch.Tensor], object]:
    model = load_model(path, **opts)
    pool = model.make_kv_pool(num_blocks(seqs), 4)
    out = model(batch_for(seqs), pool)
    return list(out.split([len(s) for s in seqs])), model


@pytest.fixture(scope="module")
def dequantized(reference):
    """ftype -> (path, transformers model on the file's dequantized weights)."""
    made = {}

    def get(ftype: str):
        if ftype not in made:
            hf, path = reference("quant", ftype, "mla")
            deq = type(hf)(hf.config).eval()
            load_dequantized(deq, path)
            made[ftype] = (path, deq)
        return made[ftype]

    return get


def errors(ours: list[torch.Tensor], deq, seqs) -> tuple[float, float, float]:
    """(max abs error, relative RMS error, argmax agreement) against transformers."""
    got = torch.cat(ours)
    want = torch.cat([hf_logits(deq, ids) for ids in seqs])
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    return (got - want).abs().max().item(), ((got - want).norm() / want.norm()).item(), agree


@pytest.mark.parametrize("ftype", FTYPES)
def test_file_mixes_the_expected_types(dequantized, ftype):
    path, _ = dequantized(ftype)
    types = {t.qtype for t in GGUFFile(path).tensors.values()}
    want = {"q8_0": {QT.Q8_0}, "q4_k_m": {QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.Q5_K},
            "q6_k": {QT.Q6_K, QT.Q8_0}, "q5_k_m": {QT.Q5_K, QT.Q5_1, QT.Q6_K},
            "q4_0": {QT.Q4_0}}
    assert want[ftype] <= types


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("backend", ["torch", "dequantize"])
def test_float32_backends_match_transformers(dequantized, ftype, backend):
    path, deq = dequantized(ftype)
    ours, _ = run_all(path, SEQS, dtype="float32", quant_backend=backend)
    err, _, agree = errors(ours, deq, SEQS)
    assert err <= F32_TOL and agree == 1.0, (err, agree)


@needs_kernels
@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("dtype", ["auto", "float32"])
@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "naive"])
def test_native_kernels_match_transformers(dequantized, ftype, dtype, absorbed):
    path, deq = dequantized(ftype)
    ours, model = run_all(path, SEQS, dtype=dtype, quant_backend="native",
                          absorbed_mla=absorbed)
    assert isinstance(model.blocks[1].ffn.experts.gate_up, QuantWeight)  # kept as blocks
    _, rel, agree = errors(ours, deq, SEQS)
    bound, min_agree = NATIVE_REL[dtype]
    assert rel <= bound and agree >= min_agree, (rel, agree)


@needs_kernels
@pytest.mark.parametrize("ftype", FTYPES)
def test_native_decode_steps_match_transformers(dequantized, ftype):
    """Prefill, then decode token by token (the 1-row kernels and the grouped experts)."""
    from llama_mpi.models.forward_batch import ForwardBatch

    path, deq = dequantized(ftype)
    model = load_model(path, dtype="float32", quant_backend="native")
    seq = SEQS[0]
    pool = model.make_kv_pool(num_blocks([seq]), 4)
    table = list(range(num_blocks([seq])))
    got = [model(ForwardBatch.build([(seq[:8], 0, table)], 4, all_logits=True), pool)]
    for pos in range(8, len(seq)):
        got.append(model(ForwardBatch.build([([seq[pos]], pos, table)], 4), pool))
    _, rel, agree = errors([torch.cat(got)], deq, [seq])
    bound, min_agree = NATIVE_REL["decode"]
    assert rel <= bound and agree >= min_agree, (rel, agree)
