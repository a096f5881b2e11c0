"""The decode kernel against torch's float32 matmul: same products, bf16-rounded output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama_mpi.models.kernels import fast_linear


@pytest.fixture(scope="module")
def kernel():
    lib = fast_linear.kernel()
    if lib is None:
        pytest.skip("no AVX512-BF16 CPU or no C compiler here: linear() is plain F.linear")
    return lib


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6, 8, 13, 16])
@pytest.mark.parametrize("n,k", [(1, 32), (7, 33), (130, 64), (577, 2048), (1024, 1408),
                                 (96, 10944), (3, 5)])
def test_kernel_matches_float32_matmul(kernel, m, n, k):
    gen = torch.Generator().manual_seed(n * 31 + k + m)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    want = F.linear(x.float(), w.float())  # exact products of the bf16 inputs, fp32 sums
    got = fast_linear.linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    # only the final rounding to bf16 (2^-8 relative) and fp32 summation order differ
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-3 * k**0.5)


def test_wide_batches_and_other_dtypes_use_torch(kernel):
    w = torch.randn(64, 32)
    x = torch.randn(2, 32)
    torch.testing.assert_close(fast_linear.linear(x, w), F.linear(x, w))  # float32
    wb, xb = w.bfloat16(), torch.randn(17, 32).bfloat16()  # more rows than the kernel takes
    assert torch.equal(fast_linear.linear(xb, wb), F.linear(xb, wb))


@pytest.mark.parametrize("m", [1, 3])
def test_batched_kernel_matches_float32_bmm(kernel, m):
    gen = torch.Generator().manual_seed(m)
    w = torch.randn(16, 512, 128, generator=gen).to(torch.bfloat16)  # like k_b: [h, C, Dn]
    x = torch.randn(16, m, 128, generator=gen).to(torch.bfloat16)
    want = torch.bmm(x.float(), w.float().transpose(1, 2))
    got = fast_linear.batched_linear(x, w)
    assert got.shape == (16, m, 512)
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)


def test_grouped_kernel_matches_float32_per_expert(kernel):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(8, 96, 64, generator=gen).to(torch.bfloat16)  # 8 stacked experts
    idx, counts = [5, 0, 7, 2], [1, 3, 16, 2]
    x = torch.randn(sum(counts), 64, generator=gen).to(torch.bfloat16)
    got = fast_linear.grouped_matmul(x, w, idx, counts)
    owner = [e for e, n in zip(idx, counts, strict=True) for _ in range(n)]
    want = torch.stack([x[r].float() @ w[e].float().t() for r, e in enumerate(owner)])
    torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-2)
    assert fast_linear.grouped_matmul(x, w, [1], [sum(counts)]) is None  # 22 rows: too many
