"""Routed experts held by one rank, computed two ways.

``LoopExperts`` is the plain reference: for each local expert, find its tokens and run the
SwiGLU. ``FusedExperts`` sorts (token, slot) pairs by expert once, runs each expert on a
contiguous slice of the sorted activations and scatters the weighted results back in one
``index_add_``: one host sync per layer instead of one per expert.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.kernels.fast_linear import grouped_matmul, linear
from llama_mpi.models.layers import silu_mul
from llama_mpi.models.weight_loader import Weight, WeightPolicy, load_weight, stack_rows
from llama_mpi.moe.combine import weighted_scatter_add


class Experts(ABC):
    """Experts ``first .. first + n - 1`` of a layer's stacked expert tensors."""

    def __init__(self, gate_up: Weight, down: Weight, first: int) -> None:
        self.gate_up = gate_up  # [n, 2 * Fe, E]
        self.down = down  # [n, E, Fe]
        self.first = first
        self.count = gate_up.shape[0]

    @classmethod
    def from_gguf(cls, gf: GGUFFile, layer: int, experts: tuple[int, int], n_experts: int,
                  hidden: int, width: int, policy: WeightPolicy) -> Experts:
        lo, hi, p = experts[0], experts[1], f"blk.{layer}."
        names = [p + "ffn_gate_exps.weight", p + "ffn_up_exps.weight"]
        gate, up = (load_weight(gf, n, policy, start=lo, stop=hi,
                                expect=(n_experts, width, hidden)) for n in names)
        down = load_weight(gf, p + "ffn_down_exps.weight", policy, start=lo, stop=hi,
                           expect=(n_experts, hidden, width))
        return cls(stack_rows(gf, [gate, up], names, policy), down, lo)

    def num_params(self) -> int:
        return self.gate_up.numel() + self.down.numel()

    def expert(self, x: torch.Tensor, local: int) -> torch.Tensor:
        return linear(silu_mul(linear(x, self.gate_up[local])), self.down[local])

    @abstractmethod
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts that live here of ``weight * expert(x)``,
        accumulated in float32 (k expert outputs summed in bf16 would lose bits).

        ``x`` [T, E]; ``ids`` [T, k] global expert ids; ``weights`` [T, k] float32.
        Slots routed to experts held elsewhere contribute nothing.
        """


class LoopExperts(Experts):
    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        local_ids = ids - self.first
        for e in range(self.count):
            tok, slot = torch.where(local_ids == e)
            if tok.numel():
                out.index_add_(0, tok, self.expert(x[tok], e).float() * weights[tok, slot, None])
        return out


class FusedExperts(Experts):
    SMALL = 32  # (token, slot) pairs below which grouping on the host beats tensor bookkeeping

    def __call__(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if ids.numel() <= self.SMALL:
            return self._few(x, ids, weights)
        local = (ids - self.first).flatten()
        keep = (local >= 0) & (local < self.count)
        pair = torch.nonzero(keep).squeeze(1)  # (token, slot) pairs served here
        order = torch.argsort(local[pair], stable=True)
        pair = pair[order]
        counts = torch.bincount(local[pair], minlength=self.count).tolist()  # the one sync
        tokens = pair // ids.shape[1]
        xs = x[tokens]
        active = [e for e, n in enumerate(counts) if n]
        ys = self._grouped(xs, active, [counts[e] for e in active])
        if ys is None:  # groups too large for the decode kernel (prefill), or no kernel
            ys = torch.empty_like(xs)
            start = 0
            for e in active:
                ys[start : start + counts[e]] = self.expert(xs[start : start + counts[e]], e)
                start += counts[e]
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return weighted_scatter_add(out, tokens, ys, weights.flatten()[pair])

    def _few(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decode-sized batches: one sync for the routing, then each chosen expert once over
        the tokens that picked it (a few dozen Python steps instead of ~15 tensor ops)."""
        groups: dict[int, tuple[list[int], list[float]]] = {}
        for t, (row, wrow) in enumerate(zip((ids - self.first).tolist(), weights.tolist(),
                                            strict=True)):
            for e, wt in zip(row, wrow, strict=True):
                if 0 <= e < self.count:
                    toks, ws = groups.setdefault(e, ([], []))
                    toks.append(t)
                    ws.append(wt)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if not groups:  # none of the chosen experts lives on this rank
            return out
        experts = list(groups)
        toks = [t for e in experts for t in groups[e][0]]
        counts = [len(groups[e][0]) for e in experts]
        xs = x[toks]
        y = self._grouped(xs, experts, counts)
        if y is None:  # no kernel: each expert over its rows, in the same order
            y = torch.cat([self.expert(part, e)
                           for part, e in zip(xs.split(counts), experts, strict=True)])
        weights = torch.tensor([w for e in experts for w in groups[e][1]], dtype=torch.float32,
                               device=x.device)
        idx = torch.tensor(toks, dtype=torch.int64, device=x.device)
        return weighted_scatter_add(out, idx, y, weights)

    def _grouped(self, xs: torch.Tensor, experts: list[int], counts: list[int]
                 ) -> torch.Tensor | None:
        """Rows of ``xs`` grouped by expert (``counts`` rows each) through their experts in
        two grouped kernel calls (gate/up, then down); None where the kernel cannot."""
        gate_up = grouped_matmul(xs, self.gate_up, experts, counts)
        if gate_up is None:
            return None
        return grouped_matmul(silu_mul(gate_up), self.down, experts, counts)

def make_experts(fused: bool) -> type[Experts]:
    return FusedExperts if fused else LoopExperts
