"""A plain decode loop straight on the model (no engine, scheduler or sampler): one
sequence through the paged cache, prefill then one token per step. Tests use it as the
independent reference the serving engine is compared with."""

from __future__ import annotations

import time

import torch

from llama_mpi.models.deepseek_v2 import DeepseekV2
from llama_mpi.models.forward_batch import ForwardBatch

BLOCK_SIZE = 16


def generate(model: DeepseekV2, prompt_ids: list[int], n_tokens: int, temperature: float = 0.0,
             seed: int | None = None, stop_ids: set[int] | None = None
             ) -> tuple[list[int], float, float]:
    """Returns (new token ids, prompt seconds, decode seconds). Greedy at temperature 0."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    total = len(prompt_ids) + n_tokens
    table = list(range(-(-total // BLOCK_SIZE)))
    pool = model.make_kv_pool(len(table), BLOCK_SIZE)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    t0 = time.perf_counter()
    logits = model(ForwardBatch.build([(prompt_ids, 0, table)], BLOCK_SIZE), pool)
    t1 = time.perf_counter()
    while len(out) < n_tokens:
        if temperature <= 0:
            tok = int(logits[0].argmax())
        else:
            probs = torch.softmax(logits[0] / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
        out.append(tok)
        if (stop_ids and tok in stop_ids) or len(out) == n_tokens:
            break
        cached = len(prompt_ids) + len(out) - 1
        logits = model(ForwardBatch.build([([tok], cached, table)], BLOCK_SIZE), pool)
    return out, t1 - t0, time.perf_counter() - t1
