"""Batched sampler against transformers' logits processors and hand-computed references."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.mpi_server.engine.penalties import apply_penalties
from llama_mpi.mpi_server.engine.sampler import Sampler, apply_min_p, apply_top_k_top_p
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers", reason="reference warpers come from HF")
V = 64


def rand_logits(n: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


def call(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], gens=None):
    n = len(params)
    return sampler(logits, params, [[] for _ in range(n)], [[] for _ in range(n)],
                   gens or [None] * n)  # fmt: skip


def survivors(x: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(x)


def test_top_k_matches_transformers() -> None:
    logits, ks = rand_logits(4), [1, 5, 20, V]
    ours = apply_top_k_top_p(logits, torch.tensor(ks), None)
    for row, k in enumerate(ks):
        ref = transformers.TopKLogitsWarper(k)(None, logits[row : row + 1])
        assert torch.equal(survivors(ours[row]), survivors(ref[0]))


def test_top_p_matches_transformers() -> None:
    logits, ps = rand_logits(4, seed=1), [0.1, 0.5, 0.9, 1.0]
    ours = apply_top_k_top_p(logits, None, torch.tensor(ps))
    for row, p in enumerate(ps):
        ref = transformers.TopPLogitsWarper(p)(None, logits[row : row + 1])
        assert torch.equal(survivors(ours[row]), survivors(ref[0]))


def test_top_k_then_top_p_matches_transformers_chain() -> None:
    logits, ks, ps = rand_logits(3, seed=2), [3, 10, V], [0.8, 0.6, 0.95]
    ours = apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for row in range(3):
        ref = transformers.TopKLogitsWarper(ks[row])(None, logits[row : row + 1])
        ref = transformers.TopPLogitsWarper(ps[row])(None, ref)
        assert torch.equal(survivors(ours[row]), survivors(ref[0]))


def test_min_p_matches_transformers() -> None:
    logits, ms = rand_logits(4, seed=3), [0.0, 0.05, 0.3, 1.0]
    ours = apply_min_p(logits, torch.tensor(ms))
    for row, m in enumerate(ms):
        ref = transformers.MinPLogitsWarper(m)(None, logits[row : row + 1])
        assert torch.equal(survivors(ours[row]), survivors(ref[0]))


def test_repetition_penalty_matches_transformers() -> None:
    logits = rand_logits(2, seed=4)
    prompts, outputs, pens = [[1, 2, 3], [10, 11]], [[3, 4], [12, 12]], [1.3, 0.7]
    params = [SamplingParams(repetition_penalty=p) for p in pens]
    ours = apply_penalties(logits, params, prompts, outputs)
    for row in range(2):
        ids = torch.tensor([prompts[row] + outputs[row]])
        ref = transformers.RepetitionPenaltyLogitsProcessor(pens[row])(ids, logits[row : row + 1])
        torch.testing.assert_close(ours[row], ref[0])


def test_presence_and_frequency_follow_openai_formula() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, -1.0]])
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)]
    ours = apply_penalties(logits, params, [[0, 0, 0]], [[1, 3, 3, 3]])
    # mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence; prompt is ignored
    expected = torch.tensor([[1.0, 2.0 - 0.25 - 0.5, 3.0, -1.0 - 3 * 0.25 - 0.5]])
    torch.testing.assert_close(ours, expected)


def test_penalties_skip_when_unused() -> None:
    logits = rand_logits(2, seed=5)
    out = apply_penalties(logits, [SamplingParams()] * 2, [[1, 2], [3]], [[4], [5]])
    assert torch.equal(out, logits)


def test_greedy_equals_argmax() -> None:
    logits = rand_logits(8, seed=6)
    res = call(Sampler(V), logits, [SamplingParams(temperature=0.0)] * 8)
    assert torch.equal(res.token_ids, logits.argmax(dim=1))
    assert res.logprobs is None and res.top_ids is None


def test_greedy_row_in_mixed_batch_equals_argmax_after_penalties() -> None:
    logits = rand_logits(2, seed=7)
    top = int(logits[0].argmax())
    params = [SamplingParams(temperature=0.0, presence_penalty=2.0), SamplingParams(top_k=3)]
    res = Sampler(V)(logits, params, [[], []], [[top] * 5, []], [None, None])
    penalised = apply_penalties(logits, params, [[], []], [[top] * 5, []])
    assert int(res.token_ids[0]) == int(penalised[0].argmax())
    assert int(res.token_ids[0]) != top


def test_same_seed_same_tokens_different_seed_differs() -> None:
    sampler, logits = Sampler(V), torch.zeros(1, V)  # flat: every draw is informative

    def draws(seed: int) -> list[int]:
        gen = torch.Generator().manual_seed(seed)
        return [int(call(sampler, logits, [SamplingParams(seed=seed)], [gen]).token_ids[0])
                for _ in range(6)]  # fmt: skip

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_seeded_row_ignores_batch_neighbours() -> None:
    sampler, logits = Sampler(V), torch.zeros(3, V)
    alone = call(sampler, logits[:1], [SamplingParams()], [torch.Generator().manual_seed(9)])
    params = [SamplingParams()] * 3
    gens = [None, torch.Generator().manual_seed(9), None]
    batched = call(sampler, logits, params, gens)
    assert int(batched.token_ids[1]) == int(alone.token_ids[0])


def test_frequencies_match_softmax() -> None:
    v, n = 6, 6000
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    torch.manual_seed(0)  # unseeded rows use the global RNG
    res = call(Sampler(v), row.expand(n, v).clone(), [SamplingParams()] * n)
    freq = torch.bincount(res.token_ids, minlength=v).double() / n
    probs = row.double().softmax(0)
    sigma = (probs * (1 - probs) / n).sqrt()
    assert torch.all((freq - probs).abs() <= 5 * sigma + 1e-3), (freq, probs)


def test_sampled_tokens_stay_inside_filters() -> None:
    logits = rand_logits(64, seed=8)
    params = [SamplingParams(top_k=4, top_p=0.9, min_p=0.05, temperature=0.8)] * 64
    res = call(Sampler(V), logits, params)
    allowed = logits.topk(4, dim=1).indices
    assert torch.all((allowed == res.token_ids.unsqueeze(1)).any(dim=1))


def test_logit_bias_forces_token() -> None:
    logits = rand_logits(4, seed=9)
    params = [SamplingParams(logit_bias={17: 100.0})] * 2 + [
        SamplingParams(temperature=0.0, logit_bias={5: 100.0}),
        SamplingParams(top_k=1, logit_bias={40: 100.0}),
    ]
    res = call(Sampler(V), logits, params)
    assert res.token_ids.tolist() == [17, 17, 5, 40]


def test_logprobs_are_raw_log_softmax() -> None:
    logits = rand_logits(3, seed=10)
    params = [SamplingParams(logprobs=True, top_logprobs=3, repetition_penalty=2.0,
                             temperature=t) for t in (0.0, 0.5, 1.5)]  # fmt: skip
    res = Sampler(V)(logits, params, [[1], [2], [3]], [[], [], []], [None] * 3)
    ref = torch.log_softmax(logits, dim=1)
    torch.testing.assert_close(res.logprobs, ref.gather(1, res.token_ids.unsqueeze(1))[:, 0])
    top = ref.topk(3, dim=1)
    torch.testing.assert_close(res.top_logprobs, top.values)
    assert torch.equal(res.top_ids, top.indices)


def test_top_logprobs_width_is_batch_max() -> None:
    params = [SamplingParams(top_logprobs=2), SamplingParams(top_logprobs=5), SamplingParams()]
    res = call(Sampler(V), rand_logits(3, seed=11), params)
    assert res.top_ids.shape == (3, 5) and res.top_logprobs.dtype == torch.float32
    assert res.logprobs.shape == (3,)


def test_presample_keeps_greedy_result() -> None:
    logits = rand_logits(6, seed=12)
    params = [SamplingParams(temperature=0.0, logit_bias={3: 50.0})] * 3
    params += [SamplingParams(temperature=0.0)] * 3
    full = call(Sampler(V), logits, params).token_ids
    pre = call(Sampler(V, presample_count=4), logits, params).token_ids
    assert torch.equal(full, pre)


def test_presample_samples_among_top_candidates() -> None:
    logits = rand_logits(32, seed=13)
    params = [SamplingParams(temperature=1.5)] * 16 + [SamplingParams(temperature=0.0)] * 16
    res = call(Sampler(V, presample_count=5), logits, params)
    cands = logits.topk(5, dim=1).indices
    assert torch.all((cands == res.token_ids.unsqueeze(1)).any(dim=1))
    assert torch.equal(res.token_ids[16:], logits[16:].argmax(dim=1))


def test_presample_logprobs_use_full_vocabulary() -> None:
    logits = rand_logits(2, seed=14)
    res = call(Sampler(V, presample_count=3), logits, [SamplingParams(logprobs=True)] * 2)
    ref = torch.log_softmax(logits, dim=1).gather(1, res.token_ids.unsqueeze(1))[:, 0]
    torch.testing.assert_close(res.logprobs, ref)


def test_bad_presample_count_rejected() -> None:
    with pytest.raises(ValueError, match="presample_count"):
        Sampler(V, presample_count=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_with_device_generator() -> None:
    logits = rand_logits(3, seed=15).cuda()
    params = [SamplingParams(temperature=0.0), SamplingParams(top_p=0.9, presence_penalty=1.0),
              SamplingParams(seed=3, logprobs=True)]  # fmt: skip
    gens = [None, None, torch.Generator(device="cuda").manual_seed(3)]
    res = Sampler(V, presample_count=8)(logits, params, [[1]] * 3, [[2]] * 3, gens)
    assert res.token_ids.device.type == "cuda"
    assert int(res.token_ids[0]) == int(logits[0].argmax())
