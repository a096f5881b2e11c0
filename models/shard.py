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

    def columns(self, width: int, what: str = "FFN columns", align: int = 1) -> tuple[int, int]:
        """This rank's columns of ``width``. With ``align`` > 1 (the block size of a
        quantized down projection) the split falls between blocks, as evenly as whole blocks
        allow (ranks may differ by one block: partial sums do not care); where there are
        fewer blocks than ranks it is even, and the caller dequantizes the cut slice."""
        blocks = width // align if align > 1 and width % align == 0 else 0
        if blocks < self.tp_size or blocks % self.tp_size == 0:
            return split_range(width, self.tp_size, self.tp_rank, what)
        base, extra = divmod(blocks, self.tp_size)
        lo = self.tp_rank * base + min(self.tp_rank, extra)
        return lo * align, (lo + base + (self.tp_rank < extra)) * align

    def experts(self, n_experts: int) -> tuple[int, int]:
        return split_range(n_experts, self.ep_size, self.ep_rank, "routed experts")
