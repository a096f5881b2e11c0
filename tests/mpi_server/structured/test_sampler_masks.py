"""The batched sampler with grammar masks: constrained rows draw only allowed tokens, free rows
are drawn exactly as without masks, and logprobs are over the allowed tokens."""

from __future__ import annotations

import torch

from llama_mpi.mpi_server.engine.sampler import Sampler
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.structured import compiler_for, from_json_schema


def test_masks_apply_to_constrained_rows_only(small_tokenizer) -> None:
    compiled = compiler_for(small_tokenizer).compile(
        from_json_schema({"enum": ["alpha", "beta"]}))
    vocab = small_tokenizer.vocab_size
    logits = torch.randn(3, vocab + 7, generator=torch.Generator().manual_seed(0))  # padded
    params = [SamplingParams(temperature=0.8, seed=1, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=0.8, seed=2, logprobs=True, top_logprobs=5),
              SamplingParams(temperature=0.0, logprobs=True, top_logprobs=5)]
    gens = [torch.Generator().manual_seed(p.seed or 0) for p in params]
    matchers = [compiled.matcher(), None, compiled.matcher()]
    allowed = matchers[0].allowed_mask(vocab + 7)
    sampler = Sampler(vocab + 7)
    out = sampler(logits.clone(), params, [[1]] * 3, [[]] * 3, gens, matchers=matchers)
    assert sampler.last_mask_seconds > 0

    free_gens = [torch.Generator().manual_seed(p.seed or 0) for p in params]
    free = sampler(logits.clone(), params, [[1]] * 3, [[]] * 3, free_gens)
    assert int(out.token_ids[1]) == int(free.token_ids[1])  # the free row: same draw
    assert float(out.logprobs[1]) == float(free.logprobs[1])
    for row in (0, 2):
        assert allowed[int(out.token_ids[row])]
        top = out.top_ids[row][torch.isfinite(out.top_logprobs[row])]
        assert len(top) > 0 and all(allowed[int(t)] for t in top)
        # the chosen token's logprob is under the distribution over allowed tokens only
        masked = logits[row].masked_fill(~allowed, float("-inf")).log_softmax(0)
        assert torch.isclose(out.logprobs[row], masked[out.token_ids[row]])
