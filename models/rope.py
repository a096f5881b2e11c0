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
    high = min(math.ceil(correction_dim(cfg.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


class RotaryEmbedding:
    """Precomputed cos/sin per position; grows on demand."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.inv_freq = inv_frequencies(cfg).to(device)
        self._cos = torch.empty(0, self.inv_freq.numel(), device=device)
        self._sin = self._cos

    def _ensure(self, n: int) -> None:
        if n <= self._cos.shape[0]:
            return
        n = max(n, 2 * self._cos.shape[0], 256)
        pos = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(pos, self.inv_freq)
        self._cos, self._sin = freqs.cos(), freqs.sin()

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, dim/2]`` cos and sin (float32) for ``positions`` ([T])."""
        self._ensure(int(positions.max()) + 1 if positions.numel() else 1)
        positions = positions.to(self._cos.device)
        return self._cos[positions], self._sin[positions]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of the last dim of ``x`` ([T, ..., dim]); cos/sin are ``[T, dim/2]``."""
    shape = x.shape
    xf = x.float().reshape(shape[0], -1, shape[-1] // 2, 2)
    c = cos.view(shape[0], 1, -1)
    s = sin.view(shape[0], 1, -1)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(shape).to(x.dtype)
