"""The paged latent cache: incremental decoding and mixed batches give transformers' logits."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.loader import load_model
from tests.models.reference_decode import generate

from .conftest import SEQS
from .hf_reference import hf_logits

TOL = 1e-4


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "naive"])
def test_token_by_token_decoding_equals_full_forward(reference, absorbed):
    hf, path = reference("full", "f32", "mla")
    ids = SEQS[0]
    want = hf_logits(hf, ids)
    model = load_model(path, absorbed_mla=absorbed)
    pool = model.make_kv_pool(16, 4)
    table = [9, 2, 14, 0, 7]  # blocks out of order: addressing must go through the table
    prefix = 5
    got = [model(ForwardBatch.build([(ids[:prefix], 0, table)], 4, all_logits=True), pool)]
    for pos in range(prefix, len(ids)):
        got.append(model(ForwardBatch.build([([ids[pos]], pos, table)], 4), pool))
    got_all = torch.cat(got)
    assert (got_all - want).abs().max().item() <= TOL


def test_mixed_batch_equals_each_sequence_alone(reference):
    """Decodes of two sequences and a chunked prefill of a third, in one step."""
    hf, path = reference("lite", "f32", "legacy")
    model = load_model(path)
    pool = model.make_kv_pool(24, 4)
    a, b, c = SEQS
    ta, tb, tc = [0, 3, 6, 9, 12], [1, 4], [2, 5, 8, 11]
    model(ForwardBatch.build([(a[:-1], 0, ta), (b[:-1], 0, tb), (c[:6], 0, tc)], 4), pool)
    step = ForwardBatch.build([([a[-1]], len(a) - 1, ta), ([b[-1]], len(b) - 1, tb),
                               (c[6:], 6, tc)], 4, all_logits=True)
    out = model(step, pool)
    assert (out[0] - hf_logits(hf, a)[-1]).abs().max().item() <= TOL
    assert (out[1] - hf_logits(hf, b)[-1]).abs().max().item() <= TOL
    assert (out[2:] - hf_logits(hf, c)[6:]).abs().max().item() <= TOL


@pytest.mark.parametrize("variant", ["lite", "full"])
def test_32_greedy_tokens_equal_transformers_generate(reference, variant):
    hf, path = reference(variant, "f32", "mla")
    prompt = SEQS[1]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    got, _, _ = generate(load_model(path), prompt, 32)
    assert got == want[0, len(prompt):].tolist()


def test_absorbed_mode_with_long_chunks_attended_naively(reference):
    """enable_mla attends chunks longer than absorb_max_queries naively (cheaper for long
    prefill); prefill and the following decode steps still match transformers."""
    hf, path = reference("full", "f32", "mla")
    ids = SEQS[0]
    model = load_model(path, absorbed_mla=True)
    for block in model.blocks:
        block.attn.absorb_max_queries = 3
    pool = model.make_kv_pool(16, 4)
    table = [4, 1, 3, 0, 2]
    got = [model(ForwardBatch.build([(ids[:10], 0, table)], 4, all_logits=True), pool)]
    for pos in range(10, len(ids)):
        got.append(model(ForwardBatch.build([([ids[pos]], pos, table)], 4), pool))
    assert (torch.cat(got) - hf_logits(hf, ids)).abs().max().item() <= TOL


def test_bfloat16_token_by_token_decoding_follows_transformers(reference):
    """The bf16 decode path (decode kernels where the CPU has them, grouped experts) against
    transformers in float32 on the same bf16-rounded weights."""
    from .hf_reference import load_dequantized

    hf, path = reference("full", "bf16", "mla")
    deq = type(hf)(hf.config).eval()
    load_dequantized(deq, path)
    ids = SEQS[0] + SEQS[2]
    want = hf_logits(deq, ids)
    model = load_model(path)
    assert model.opts.dtype == torch.bfloat16
    pool = model.make_kv_pool(16, 4)
    table = list(range(9))
    got = [model(ForwardBatch.build([(ids[:4], 0, table)], 4, all_logits=True), pool)]
    for pos in range(4, len(ids)):
        got.append(model(ForwardBatch.build([([ids[pos]], pos, table)], 4), pool))
    got_all = torch.cat(got)
    assert (got_all.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    assert (got_all - want).abs().max().item() <= 0.25  # bf16 activations: ~1e-2 relative


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
def test_bfloat16_mixed_batch_follows_transformers(reference, monkeypatch, kernels):
    """One bf16 step holding two decode rows, a short chunk (absorbed: the attention kernel
    where the CPU has it, else torch per sequence) and a long chunk (naive): each sequence's
    logits against transformers in float32 on the same bf16-rounded weights."""
    from llama_mpi.models import attention

    from .hf_reference import load_dequantized

    if not kernels:
        monkeypatch.setattr(attention, "available", lambda dtype, device: False)
    hf, path = reference("full", "bf16", "mla")
    deq = type(hf)(hf.config).eval()
    load_dequantized(deq, path)
    model = load_model(path)
    for block in model.blocks:
        block.attn.absorb_max_queries = 4  # the 9-token chunk below goes naive
    a, b, c = SEQS
    d = SEQS[0][::-1]
    ta, tb, tc, td = [0, 3, 6, 9, 12], [1, 4], [2, 5, 8, 11], [7, 10, 13, 14, 15]
    pool = model.make_kv_pool(24, 4)
    model(ForwardBatch.build([(a[:-1], 0, ta), (b[:-1], 0, tb), (c[:6], 0, tc),
                              (d[:3], 0, td)], 4), pool)
    step = ForwardBatch.build([([a[-1]], len(a) - 1, ta), ([b[-1]], len(b) - 1, tb),
                               (c[6:9], 6, tc), (d[3:12], 3, td)], 4, all_logits=True)
    out = model(step, pool)
    want = torch.cat([hf_logits(deq, a)[-1:], hf_logits(deq, b)[-1:], hf_logits(deq, c)[6:9],
                      hf_logits(deq, d)[3:12]])
    assert out.shape == want.shape
    assert (out.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9
    assert (out - want).abs().max().item() <= 0.25  # bf16 activations: ~1e-2 relative
