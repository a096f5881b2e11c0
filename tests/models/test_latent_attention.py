"""The absorbed-MLA attention kernel against a float64 softmax attention, and the per-row
context addressing of a batch."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.kernels.cpu_kernels import kernel
from llama_mpi.models.latent_attention import RowContexts, latent_attention


@pytest.fixture(scope="module")
def lib():
    if kernel() is None:
        pytest.skip("no AVX512-BF16 CPU or no C compiler here: attention runs in torch")
    return kernel()


def reference(q, pool, rows: RowContexts, c: int, scale: float) -> torch.Tensor:
    out = []
    for r in range(q.shape[0]):
        s0, n = int(rows.start[r]), int(rows.length[r])
        kv = pool[rows.slots[s0 : s0 + n]].double()  # [L, D]
        p = torch.softmax(q[r].double() @ kv.t() * scale, dim=-1)  # [H, L]
        out.append(p @ kv[:, :c])
    return torch.stack(out)


@pytest.mark.parametrize("c,rope,heads", [(512, 64, 16), (48, 8, 3), (64, 16, 5)])
def test_kernel_matches_float64_attention(lib, c, rope, heads):
    gen = torch.Generator().manual_seed(c + heads)
    d, slots_total = c + rope, 300
    pool = torch.randn(slots_total, d, generator=gen).to(torch.bfloat16)
    # two sequences with scrambled slots: one decode row (context 37), three rows of a
    # chunk whose context ends at 201 (causal: 199, 200, 201 keys)
    perm = torch.randperm(slots_total, generator=gen)
    slots = torch.cat([perm[:37], perm[37:238]])
    rows = RowContexts(slots, torch.tensor([0, 37, 37, 37]), torch.tensor([37, 199, 200, 201]))
    q = (torch.randn(4, heads, d, generator=gen) * 0.3).to(torch.bfloat16)
    scale = d**-0.5
    got = latent_attention(q, pool, rows, c, scale)
    want = reference(q, pool, rows, c, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (4, heads, c)
    torch.testing.assert_close(got.double(), want, rtol=2**-7, atol=2e-3)


def test_peaked_scores_stay_finite(lib):
    """Large scores (a near one-hot softmax) must not overflow: the max is subtracted."""
    pool = torch.zeros(8, 576, dtype=torch.bfloat16)
    pool[3, 0] = 100.0
    pool[3, 1] = 7.0
    q = torch.zeros(1, 2, 576, dtype=torch.bfloat16)
    q[..., 0] = 100.0
    rows = RowContexts(torch.arange(8), torch.tensor([0]), torch.tensor([8]))
    got = latent_attention(q, pool, rows, 512, 1.0)
    assert torch.isfinite(got.float()).all()
    assert got[0, :, 1].float().tolist() == [7.0, 7.0]  # all weight on slot 3


def test_row_contexts_are_causal_per_sequence():
    # sequence 0: 2 new tokens after 3 cached; sequence 1: one decode token after 6 cached
    batch = ForwardBatch.build([([7, 8], 3, [2, 0]), ([9], 6, [1, 3])], block_size=4)
    ctx = batch.row_contexts(4)
    assert ctx.slots.tolist() == [8, 9, 10, 11, 0, 4, 5, 6, 7, 12, 13, 14]
    assert ctx.start.tolist() == [0, 0, 5]
    assert ctx.length.tolist() == [4, 5, 7]
