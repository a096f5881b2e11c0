"""Continuous batching: which tokens of which sequences run in the next step.

Context, as in llama.cpp: ``n_ctx`` is the KV pool's size in tokens
(``num_blocks * block_size``), shared by the ``n_parallel`` slots as they need it rather than
split evenly; each sequence may grow to ``max_model_len`` tokens (prompt + output, at most
``n_ctx``). A prompt longer than ``max_model_len - 1`` is refused at submission, so every
admitted request can produce at least one token.

Each step first gives every running sequence its next tokens (a decode is one token, an
unfinished prefill a chunk), oldest first, then admits waiting requests into free slots with
a prefill chunk; at most ``n_batch`` new tokens per step in all. With ``cont_batching`` off,
new requests join only when nothing runs. When the pool runs out, a waiting request simply
waits; a running one preempts the most recently started running sequence, whose blocks are
freed and which is later recomputed from its prompt + outputs (the prefix cache usually
still holds most of it). Preemption never touches the blocks of sequences that keep running.
The waiting queue is bounded: ``max_queue`` requests beyond the free slots.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llama_mpi.mpi_server.engine.block_manager import BlockManager
from llama_mpi.mpi_server.engine.engine_api import EngineFullError
from llama_mpi.mpi_server.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int  # tokens seq.token_ids[num_cached : num_cached + num_new_tokens]

    def batch_entry(self) -> tuple[list[int], int, list[int]]:
        """``(new_token_ids, num_cached_before, block_table)`` for ``ForwardBatch.build``."""
        start = self.seq.num_cached
        new_ids = self.seq.token_ids[start : start + self.num_new_tokens]
        return new_ids, start, list(self.seq.block_table)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        n_parallel: int,
        n_batch: int,
        max_model_len: int,
        max_queue: int = 64,
        cont_batching: bool = True,
    ) -> None:
        if n_parallel < 1 or n_batch < 1 or max_model_len < 2 or max_queue < 0:
            raise ValueError("need n_parallel >= 1, n_batch >= 1, max_model_len >= 2")
        self.bm = block_manager
        self.n_parallel = n_parallel
        self.n_batch = n_batch
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.cont_batching = cont_batching
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in order of (re)start: the last is preempted first
        self.slots: list[Sequence | None] = [None] * n_parallel
        self.num_preemptions = 0

    # -- admission ----------------------------------------------------------------------------

    def check_prompt(self, num_prompt_tokens: int) -> None:
        if num_prompt_tokens < 1:
            raise ValueError("prompt is empty")
        if num_prompt_tokens > self.max_model_len - 1:
            raise ValueError(
                f"prompt has {num_prompt_tokens} tokens; the context holds {self.max_model_len}"
            )

    def is_full(self, extra: int = 0) -> bool:
        """Whether ``extra`` more submissions on top of the queue would overflow it."""
        free_slots = self.n_parallel - len(self.running)
        return len(self.waiting) + extra >= self.max_queue + free_slots

    def add(self, seq: Sequence) -> None:
        """Queue ``seq``, already checked by ``Engine.check_request``."""
        assert 0 < seq.num_prompt_tokens < self.max_model_len, seq.num_prompt_tokens
        if self.is_full():
            raise EngineFullError(f"the queue is full ({len(self.waiting)} waiting)")
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.n_batch
        out: list[ScheduledSeq] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_uncomputed, budget)
            while not self.bm.allocate(seq, n):
                victim = self.running[-1]
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is SequenceStatus.RUNNING:
                out.append(ScheduledSeq(seq, n))
                budget -= n
        # After a preemption the pool is known to be short: admitting would just thrash.
        if preempted or (not self.cont_batching and self.running):
            return out
        while self.waiting and budget > 0 and None in self.slots:
            seq = self.waiting[0]
            if not seq.block_table:
                hit = self.bm.attach_prefix(seq)
                if not seq.started:
                    seq.num_cached_prompt = hit
            n = min(seq.num_uncomputed, budget)
            if not self.bm.allocate(seq, n):
                self.bm.free_seq(seq)  # do not sit on cached blocks while waiting
                break
            self.waiting.popleft()
            self._start(seq)
            out.append(ScheduledSeq(seq, n))
            budget -= n
        return out

    def postprocess(self, scheduled: list[ScheduledSeq]) -> None:
        """The step ran: its tokens' latents are now in the cache."""
        for s in scheduled:
            if s.seq.status is SequenceStatus.RUNNING:
                s.seq.num_cached += s.num_new_tokens
                self.bm.commit(s.seq)

    # -- state changes ------------------------------------------------------------------------

    def _start(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        seq.slot = self.slots.index(None)
        self.slots[seq.slot] = seq
        self.running.append(seq)
        if not seq.started:
            seq.started = True
            seq.timings.first_scheduled = seq.now()

    def _release(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
        self.bm.free_seq(seq)

    def preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) ``seq`` wherever it is; its blocks and slot are free at once."""
        if seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = seq.now()
