"""Per-request sampling settings, as an OpenAI / llama.cpp client sends them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # a compiled grammar (structured.CompiledGrammar) every output token must fit, or None;
    # compiled off the engine thread, each sequence takes its own matcher from it
    constraint: Any = field(default=None, compare=False, repr=False)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ``ValueError("<param>: <why>")`` for values no sampler can honour (NaN fails
        every range check)."""
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1, 0 (off) or positive"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("n", 1 <= self.n <= 16, "must be in [1, 16]"),
            ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
            ("seed", self.seed is None or 0 <= self.seed < 1 << 64, "must be in [0, 2^64 - 1]"),
            ("logit_bias", all(math.isfinite(b) and -100.0 <= b <= 100.0
                               for b in self.logit_bias.values()), "biases must be in [-100, 100]"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"{name}: {why}")
        if vocab_size is not None:
            for tok in self.logit_bias:
                if not 0 <= int(tok) < vocab_size:
                    raise ValueError(f"logit_bias: token id {tok} is outside the vocabulary")
