"""One request's state inside the engine: its tokens, its cache blocks, its sampling state."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

import torch

from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.engine.stop_checker import StopChecker


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class SequenceStatus(Enum):
    WAITING = auto()  # queued, or preempted and waiting to be recomputed
    RUNNING = auto()  # holds a slot and cache blocks
    FINISHED = auto()


@dataclass
class SeqTimings:
    """``time.perf_counter()`` stamps; ``None`` until reached (or with perf collection off)."""

    arrival: float | None = None
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.arrival, self.first_scheduled, self.first_token, self.finished)


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # nondeterministic, but still per request so batching never shares a stream
    else:
        gen.manual_seed(seed)
    return gen


class Sequence:
    """Prompt + outputs in one token list; ``num_cached`` of them have latents in the cache.

    The tokens still to compute are ``token_ids[num_cached:]``: the prompt (or part of it)
    before the first token, then just the newest sampled token. After a preemption
    ``num_cached`` drops to 0 and prompt + outputs are recomputed like one long prompt.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        detokenizer: Detokenizer,
        device: torch.device | str = "cpu",
        collect_timings: bool = True,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.status = SequenceStatus.WAITING
        self.num_cached = 0
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of the leading full, computed blocks
        self.num_cached_prompt = 0  # prompt tokens served by the prefix cache at first start
        self.started = False  # admitted at least once (a preempted sequence stays started)
        self.slot: int | None = None
        self.generator = make_generator(params.seed, device)
        self.detokenizer = detokenizer
        self.stop_checker = StopChecker(params.stop)
        # grammar state (structured.GrammarMatcher) on the sampling rank only: it lives here,
        # never in the ForwardBatch that is broadcast to the other ranks
        self.matcher = params.constraint.matcher() if params.constraint is not None else None
        self.finish_reason: str | None = None
        self.collect_timings = collect_timings
        self.timings = SeqTimings(arrival=self.now())

    def now(self) -> float | None:
        return time.perf_counter() if self.collect_timings else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """Still computing more than the newest token (prompt, or a recompute)."""
        return self.num_output_tokens == 0 or self.num_uncomputed > 1

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        if self.num_output_tokens == 1:
            self.timings.first_token = self.now()

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_tokens}, "
            f"cached={self.num_cached}, blocks={self.block_table})"
        )
