"""Interleaved-pair rotary embedding with YaRN, as DeepSeek-V2 uses it.

llama.cpp's ``LLAMA_ROPE_TYPE_NORM`` and transformers' complex-number form both rotate
consecutive pairs ``(x[2i], x[2i+1])``; no weight permutation is involved. The YaRN
frequency blend follows transformers' ``_compute_yarn_parameters`` (truncated correction
range); its attention factor is 1 for every DeepSeek file because GGUF keeps only
``mscale_all_dim`` and llama.cpp takes ``mscale`` equal to it.
"""

from __future__ import annotations

import math

import torch

from llama_mpi.models.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    if not cfg.uses_yarn:
        return extrapolation
    interpolation = 1.0 / (cfg.rope_factor * pos_freqs)

    def correction_dim(rotations: float) -> float:
        orig = cfg.rope_original_context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(cfg.rope_beta_fast)), 0)
    high: float = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding:
    """Precomputed rotations ``cos + i sin`` per position (complex64); grows on demand."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inv_frequencies(cfg).to(device)
        self._cis = torch.empty(0, self.inv_freq.numel(), dtype=torch.complex64, device=device)

    def _ensure(self, n: int) -> None:
        if n <= self._cis.shape[0]:
            return
        n = max(n, 2 * self._cis.shape[0], 256)
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        self._cis = torch.polar(torch.ones(n, self.inv_freq.numel()),
                                torch.outer(pos, self.inv_freq))

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """``[T, dim/2]`` complex rotations for ``positions`` ([T])."""
        self._ensure(int(positions.max()) + 1 if positions.numel() else 1)
        return self._cis[positions.to(self._cis.device)]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the last dim of ``x`` ([T, ..., dim]) by ``rot`` ([T, dim/2]) in
    float32: the pair (a, b) is the complex number a + ib (one multiply, few ops per call)."""
    shape = x.shape
    xc = torch.view_as_complex(x.float().reshape(shape[0], -1, shape[-1] // 2, 2))
    out = torch.view_as_real(xc * rot.view(shape[0], 1, -1))
    return out.reshape(shape).to(x.dtype)
