"""Batched repetition / presence / frequency penalties and logit bias over ``[N, V]`` logits.

Token histories become one scatter each (``index_put_`` with ``accumulate``), so the cost is
one pass over the history tokens plus elementwise ops over the logits, with no Python loop
over the vocabulary.
"""

from __future__ import annotations

import itertools

import torch

from llama_mpi.mpi_server.engine.sampling_params import SamplingParams


def _flat_index(
    rows_ids: list[list[int]], vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs of every token in ``rows_ids``, ids outside V dropped."""
    lengths = torch.tensor([len(r) for r in rows_ids], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(rows_ids)), lengths)
    cols = torch.tensor(list(itertools.chain.from_iterable(rows_ids)), dtype=torch.long)
    keep = (cols >= 0) & (cols < vocab_size)  # a stray id must not crash the whole batch
    return rows[keep].to(device), cols[keep].to(device)


def token_counts(rows_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[N, V]`` float32: how often each token occurs in each row's list."""
    counts = torch.zeros(len(rows_ids), vocab_size, dtype=torch.float32, device=device)
    rows, cols = _flat_index(rows_ids, vocab_size, device)
    if cols.numel():
        counts.index_put_((rows, cols), torch.ones_like(cols, dtype=torch.float32), True)
    return counts


def apply_repetition_penalty(
    logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> torch.Tensor:
    """HF/CTRL: divide seen positive logits by the penalty, multiply seen negative ones.

    ``seen`` is a ``[N, V]`` bool mask, ``penalty`` a ``[N]`` tensor (1.0 = off).
    """
    p = penalty.unsqueeze(1)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI: ``logit - count * frequency - (count > 0) * presence`` over output tokens."""
    return (
        logits
        - counts * frequency.unsqueeze(1)
        - (counts > 0).to(logits.dtype) * presence.unsqueeze(1)
    )


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Add each row's ``logit_bias`` (token id -> bias); ids outside V are skipped."""
    vocab_size = logits.shape[1]
    entries = [
        (row, int(tok), float(bias))
        for row, p in enumerate(params)
        for tok, bias in p.logit_bias.items()  # per-request dict, at most a few hundred ids
        if 0 <= int(tok) < vocab_size
    ]
    if not entries:
        return logits
    rows, cols, vals = zip(*entries, strict=True)
    idx = (
        torch.tensor(rows, dtype=torch.long, device=logits.device),
        torch.tensor(cols, dtype=torch.long, device=logits.device),
    )
    values = torch.tensor(vals, dtype=logits.dtype, device=logits.device)
    return logits.index_put(idx, values, accumulate=True)


def apply_penalties(
    logits: torch.Tensor,
    params: list[SamplingParams],
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
) -> torch.Tensor:
    """Repetition (prompt + output), then presence/frequency (output), then logit bias.

    Penalties come before the bias so that a bias the client chose is applied as given.
    Each step is skipped when no row in the batch uses it.
    """
    vocab_size = logits.shape[1]
    device = logits.device
    use_rep = any(p.repetition_penalty != 1.0 for p in params)
    use_pf = any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params)
    if use_rep or use_pf:
        out_counts = token_counts(output_ids, vocab_size, device)
    if use_rep:
        seen = out_counts > 0
        rows, cols = _flat_index(prompt_ids, vocab_size, device)
        seen[rows, cols] = True
        rep = torch.tensor([p.repetition_penalty for p in params], device=device)
        logits = apply_repetition_penalty(logits, seen, rep)
    if use_pf:
        pres = torch.tensor([p.presence_penalty for p in params], device=device)
        freq = torch.tensor([p.frequency_penalty for p in params], device=device)
        logits = apply_presence_frequency(logits, out_counts, pres, freq)
    return apply_logit_bias(logits, params)
