"""Small building blocks: RMSNorm and the SwiGLU MLP (dense layers and shared experts)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.kernels.cpu_kernels import kernel, require_kernel
from llama_mpi.models.kernels.fast_linear import linear
from llama_mpi.models.weight_loader import Weight, WeightPolicy, load_weight, stack_rows


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in float32, multiply by the weight in the compute dtype (as transformers);
    # the result is in the weight's dtype even when the residual stream is float32
    if (weight.dtype is torch.bfloat16 and x.dim() == 2 and x.stride(-1) == 1
            and x.dtype in (torch.float32, torch.bfloat16) and x.device.type == "cpu"
            and weight.is_contiguous() and kernel() is not None):
        y = torch.empty(x.shape, dtype=torch.bfloat16)
        require_kernel().rms_norm_bf16(x.data_ptr(), int(x.dtype is torch.bfloat16), x.stride(0),
                                       weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps,
                                       torch.get_num_threads())
        return y
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * xf.to(weight.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up`` [R, 2F] (gate columns, then up): [R, F]."""
    if (gate_up.dtype is torch.bfloat16 and gate_up.dim() == 2 and gate_up.is_contiguous()
            and gate_up.device.type == "cpu" and kernel() is not None):
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        y = torch.empty(rows, width, dtype=torch.bfloat16)
        require_kernel().silu_mul_bf16(gate_up.data_ptr(), y.data_ptr(), rows, width,
                                       torch.get_num_threads())
        return y
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU:
    """``down(silu(gate(x)) * up(x))``; under TP each rank holds a column slice of the hidden
    width and returns a partial sum that the caller all-reduces."""

    def __init__(self, gate_up: Weight, down: Weight) -> None:
        self.gate_up = gate_up  # [2 * width, hidden]: gate rows then up rows
        self.down = down  # [hidden, width]

    @classmethod
    def from_gguf(
        cls, gf: GGUFFile, prefix: str, suffix: str, hidden: int, width: int,
        columns: Callable[[int], tuple[int, int]], policy: WeightPolicy,
    ) -> SwiGLU:
        """Loads ``{prefix}_{gate,up,down}{suffix}.weight``: the hidden columns that
        ``columns(align)`` gives this rank, aligned to the down projection's blocks."""
        name = f"{prefix}_{{}}{suffix}.weight".format
        align = gf.block_size(name("down")) if policy.backend is not None else 1
        lo, hi = columns(align)
        gate = load_weight(gf, name("gate"), policy, start=lo, stop=hi, expect=(width, hidden))
        up = load_weight(gf, name("up"), policy, start=lo, stop=hi, expect=(width, hidden))
        down = load_weight(gf, name("down"), policy, dim=1, start=lo, stop=hi,
                           expect=(hidden, width))
        return cls(stack_rows(gf, [gate, up], [name("gate"), name("up")], policy), down)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(silu_mul(linear(x, self.gate_up)), self.down)

    def num_params(self) -> int:
        return self.gate_up.numel() + self.down.numel()

