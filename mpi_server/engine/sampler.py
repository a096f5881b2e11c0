"""Batched sampler: grammar masks, penalties, bias, temperature, top-k / top-p / min-p, then
one draw per row.

Constrained rows (a ``GrammarMatcher`` in ``matchers``) first get every token their grammar
forbids set to -inf, so every later stage (and greedy argmax) only sees allowed tokens; free
rows are untouched and an all-free batch pays one list scan. Logprobs are taken after the
grammar mask and before penalties and temperature: the chosen token's logprob and the
``top_logprobs`` are over the tokens the grammar allowed at that step (a forced token has
logprob 0), never alternatives that could not have been drawn (vLLM's "processed" choice;
its default reports the raw ones). For free rows nothing changes.

Every step is a tensor op over all N rows with per-row parameter tensors; Python only loops
over rows to build those tensors (and to draw from a row's own seeded generator). Steps that
no row needs are skipped, and an all-greedy batch is a single argmax.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llama_mpi.mpi_server.engine.penalties import apply_penalties
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams

_NEG_INF = float("-inf")


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # [N] int64
    logprobs: torch.Tensor | None  # [N] float32, chosen token under log_softmax(masked logits)
    top_ids: torch.Tensor | None  # [N, K] int64, K = max top_logprobs in the batch
    top_logprobs: torch.Tensor | None  # [N, K] float32


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus.

    ``top_k`` is ``[N]`` int64 with ``V`` meaning off; ``top_p`` is ``[N]`` with 1.0 off.
    Ties at the k-th value are kept and the most likely token always survives, as in
    transformers' ``TopKLogitsWarper`` / ``TopPLogitsWarper`` applied in that order.
    """
    vocab_size = logits.shape[1]
    if top_p is None:
        if top_k is None:
            return logits
        # top-k alone: a partial topk up to the largest k is cheaper than a full sort
        k = top_k.clamp(1, vocab_size)
        top_vals = torch.topk(logits, int(k.max()), dim=1).values
        kth = top_vals.gather(1, (k - 1).unsqueeze(1))
        return logits.masked_fill(logits < kth, _NEG_INF)
    sorted_logits, order = torch.sort(logits, dim=1)  # ascending
    if top_k is not None:
        k = top_k.clamp(1, vocab_size)
        kth = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)
    cum = sorted_logits.softmax(dim=1).cumsum(dim=1)
    drop = cum <= (1.0 - top_p).unsqueeze(1)
    drop[:, -1] = False  # keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below ``min_p`` times the row's top probability."""
    probs = logits.softmax(dim=1)
    threshold = probs.amax(dim=1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill(probs < threshold, _NEG_INF)  # the top token always survives


def _exponential_noise(
    shape: tuple[int, int], generators: list[torch.Generator | None], device: torch.device
) -> torch.Tensor:
    """Exp(1) noise; rows with a generator draw from it alone so a seed reproduces a request."""
    noise = torch.empty(shape, device=device).exponential_()
    for row, gen in enumerate(generators):
        if gen is not None:
            draw = torch.empty(shape[1], device=gen.device).exponential_(generator=gen)
            noise[row] = draw.to(device)
    return noise


class Sampler:
    def __init__(self, vocab_size: int, presample_count: int = -1) -> None:
        if presample_count == 0 or presample_count < -1:
            raise ValueError("presample_count: must be -1 (off) or a positive integer")
        self.vocab_size = vocab_size
        self.last_mask_seconds = 0.0  # time of the last call's grammar masks
        # candidates kept before filtering; off when it would keep the whole vocabulary
        self.presample_count = presample_count if 0 < presample_count < vocab_size else -1

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        matchers: Sequence[Any] | None = None,
    ) -> SampleResult:
        """``matchers``: per row a ``structured.GrammarMatcher`` or None (free); the masks are
        written into ``logits`` in place (the step's own tensor)."""
        n = logits.shape[0]
        if not n == len(params) == len(prompt_ids) == len(output_ids) == len(generators):
            raise ValueError("sampler: one params / prompt / output / generator per logits row")
        logits = logits.float()
        self.last_mask_seconds = 0.0
        if matchers is not None and any(m is not None for m in matchers):
            from llama_mpi.mpi_server.structured.matcher import apply_grammar_masks

            t0 = time.perf_counter()
            apply_grammar_masks(logits, matchers)
            self.last_mask_seconds = time.perf_counter() - t0
        result = self._masked_logprobs(logits, params)
        logits = apply_penalties(logits, params, prompt_ids, output_ids)

        greedy = [p.temperature <= 0.0 for p in params]
        # greedy rows take the argmax of the full logits, whatever presampling keeps
        argmax = logits.argmax(dim=1) if any(greedy) else None
        if argmax is not None and all(greedy):
            return self._finish(result, argmax)

        cand_ids = None
        if self.presample_count > 0:  # the rest works on [N, k]: llama.cpp's NPU presample
            logits, cand_ids = torch.topk(logits, self.presample_count, dim=1)
        chosen = self._sample(logits, params, generators)
        if cand_ids is not None:
            chosen = cand_ids.gather(1, chosen.unsqueeze(1)).squeeze(1)
        if argmax is not None:
            chosen = torch.where(torch.tensor(greedy, device=logits.device), argmax, chosen)
        return self._finish(result, chosen)

    def _sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> torch.Tensor:
        """Column index drawn per row of ``logits`` (greedy rows draw too; caller discards)."""
        device, width = logits.device, logits.shape[1]
        temps = [p.temperature if p.temperature > 0.0 else 1.0 for p in params]
        if any(t != 1.0 for t in temps):
            logits = logits / torch.tensor(temps, device=device).unsqueeze(1)

        top_k = top_p = None
        if any(0 < p.top_k < width for p in params):
            ks = [p.top_k if p.top_k > 0 else width for p in params]
            top_k = torch.tensor(ks, dtype=torch.long, device=device).clamp(max=width)
        if any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=device)
        logits = apply_top_k_top_p(logits, top_k, top_p)
        if any(p.min_p > 0.0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))

        # exponential race: argmax(p / E) with E ~ Exp(1) is a draw from p, without a cumsum
        probs = logits.softmax(dim=1)
        noise = _exponential_noise((probs.shape[0], probs.shape[1]), generators, device)
        return (probs / noise.clamp_min_(1e-20)).argmax(dim=1)  # clamp: 0/0 would be NaN

    def _masked_logprobs(self, logits: torch.Tensor, params: list[SamplingParams]) -> SampleResult:
        """Log-softmax of the (grammar-masked) logits, kept only if a row asked for logprobs."""
        k = max((p.top_logprobs for p in params), default=0)
        result = SampleResult(torch.empty(0), None, None, None)
        if not any(p.logprobs or p.top_logprobs > 0 for p in params):
            return result
        result.logprobs = torch.log_softmax(logits, dim=1)  # full [N, V]; cut in _finish
        if k > 0:
            result.top_logprobs, result.top_ids = torch.topk(result.logprobs, k, dim=1)
        return result

    @staticmethod
    def _finish(result: SampleResult, token_ids: torch.Tensor) -> SampleResult:
        result.token_ids = token_ids
        if result.logprobs is not None:
            result.logprobs = result.logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        return result
