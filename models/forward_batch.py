"""What the model needs to run one step: a flat batch of tokens plus paged-cache addressing.

The model owns no per-sequence state. The caller (the engine's scheduler) decides which
tokens of which sequences run in this step and where their latents live in the KV pool.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from llama_mpi.models.latent_attention import RowContexts


@dataclass
class ForwardBatch:
    """One forward step over B sequences, their new tokens flattened into T rows.

    Sequence b owns rows ``query_start[b]:query_start[b+1]`` of ``input_ids``. Those are its
    newest tokens; after this step the cache holds ``context_lens[b]`` tokens for it (the
    new ones included), so its new tokens sit at positions
    ``context_lens[b] - q_len_b ... context_lens[b] - 1``.
    """

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start: torch.Tensor  # [B + 1] int64, cumulative query lengths starting at 0
    context_lens: torch.Tensor  # [B] int64, cached tokens per sequence after this step
    block_tables: torch.Tensor  # [B, max_blocks] int64, block ids (padding: 0, never read)
    slot_mapping: torch.Tensor  # [T] int64, pool slot (block * block_size + offset) per token
    logits_indices: torch.Tensor  # [N] int64, rows of T whose logits are returned

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.context_lens.shape[0])

    def to(self, device: torch.device | str) -> ForwardBatch:
        return ForwardBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def spans(self) -> list[tuple[int, int]]:
        """Per sequence, its rows ``(start, end)`` of the batch (cached on the batch)."""
        cached = self.__dict__.get("_spans")
        if cached is None:
            starts = self.query_start.tolist()
            cached = self.__dict__["_spans"] = list(zip(starts[:-1], starts[1:], strict=True))
        return cached

    def context_slots(self, block_size: int) -> list[torch.Tensor]:
        """Per sequence, the pool slots of its whole context; computed once per step and
        shared by every layer (cached on the batch)."""
        cached = self.__dict__.get("_context_slots")
        if cached is None or cached[0] != block_size:
            slots = []
            for b, ctx in enumerate(self.context_lens.tolist()):
                pos = torch.arange(ctx, device=self.block_tables.device)
                slots.append(self.block_tables[b][pos // block_size] * block_size
                             + pos % block_size)
            cached = self.__dict__["_context_slots"] = (block_size, slots)
        return cached[1]

    def row_contexts(self, block_size: int) -> RowContexts:
        """Per query row, its sequence's context slots up to and including its own position
        (cached on the batch, like ``context_slots``)."""
        cached = self.__dict__.get("_row_contexts")
        if cached is None or cached[0] != block_size:
            slots = self.context_slots(block_size)
            q_lens = self.query_start[1:] - self.query_start[:-1]
            seq_start = torch.zeros_like(self.context_lens)
            seq_start[1:] = self.context_lens.cumsum(0)[:-1]
            seq = torch.repeat_interleave(torch.arange(self.num_seqs), q_lens.cpu())
            seq = seq.to(self.query_start.device)
            index = torch.arange(self.num_tokens, device=seq.device) - self.query_start[seq]
            length = self.context_lens[seq] - q_lens[seq] + 1 + index
            flat = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.int64)
            cached = self.__dict__["_row_contexts"] = (
                block_size, RowContexts(flat, seq_start[seq].contiguous(), length.contiguous()))
        return cached[1]

    @staticmethod
    def build(
        seqs: list[tuple[list[int], int, list[int]]],
        block_size: int,
        all_logits: bool = False,
    ) -> ForwardBatch:
        """Build a batch from ``(new_token_ids, num_cached_before, block_table)`` per sequence.

        Returns the last token's logits of each sequence, or every token's with ``all_logits``.
        """
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        starts = [0]
        ctx: list[int] = []
        logits_rows: list[int] = []
        width = max((len(bt) for _, _, bt in seqs), default=1) or 1
        tables = torch.zeros(len(seqs), width, dtype=torch.int64)
        for b, (new_ids, cached, table) in enumerate(seqs):
            n = len(new_ids)
            if n == 0:
                raise ValueError("every sequence in a batch needs at least one new token")
            if (cached + n + block_size - 1) // block_size > len(table):
                raise ValueError(f"sequence {b}: block table too short for {cached + n} tokens")
            ids.extend(new_ids)
            for p in range(cached, cached + n):
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            if all_logits:
                logits_rows.extend(range(starts[-1], starts[-1] + n))
            else:
                logits_rows.append(starts[-1] + n - 1)
            starts.append(starts[-1] + n)
            ctx.append(cached + n)
            if table:
                tables[b, : len(table)] = torch.tensor(table, dtype=torch.int64)
        i64 = torch.int64
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=i64),
            positions=torch.tensor(pos, dtype=i64),
            query_start=torch.tensor(starts, dtype=i64),
            context_lens=torch.tensor(ctx, dtype=i64),
            block_tables=tables,
            slot_mapping=torch.tensor(slots, dtype=i64),
            logits_indices=torch.tensor(logits_rows, dtype=i64),
        )
