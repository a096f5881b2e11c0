"""Which part of the model one rank holds: a contiguous range of heads and of experts."""

from __future__ import annotations

from dataclasses import dataclass


def split_range(total: int, parts: int, index: int, what: str) -> tuple[int, int]:
    if parts <= 0 or total % parts:
        valid = [n for n in range(1, total + 1) if total % n == 0]
        raise ValueError(f"{parts} ranks cannot split {total} {what} evenly; valid: {valid}")
    size = total // parts
    return index * size, (index + 1) * size


@dataclass(frozen=True)
class Shard:
    """TP over attention heads and dense/shared FFN columns; EP over routed experts."""

    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0
    ep_size: int = 1

    def heads(self, n_heads: int) -> tuple[int, int]:
        return split_range(n_heads, self.tp_size, self.tp_rank, "attention heads")

    def columns(self, width: int, what: str = "FFN columns") -> tuple[int, int]:
        return split_range(width, self.tp_size, self.tp_rank, what)

    def experts(self, n_experts: int) -> tuple[int, int]:
        return split_range(n_experts, self.ep_size, self.ep_rank, "routed experts")
