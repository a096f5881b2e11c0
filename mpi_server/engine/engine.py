"""The synchronous engine core: schedule -> one forward step -> sample -> outputs.

Not thread-safe: one thread drives it (``AsyncEngine`` owns that thread). It only ever calls
``executor.execute``, so it is the same whether one process or many ranks run the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.mpi_server.engine.block_manager import BlockManager
from llama_mpi.mpi_server.engine.engine_api import EngineStats, SlotInfo
from llama_mpi.mpi_server.engine.executor import ModelExecutor
from llama_mpi.mpi_server.engine.outputs import RequestOutput, TokenLogprob
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.engine.scheduler import ScheduledSeq, Scheduler
from llama_mpi.mpi_server.engine.sequence import Detokenizer, Sequence

if TYPE_CHECKING:
    from llama_mpi.models.tokenizer.tokenizer import Tokenizer
    from llama_mpi.mpi_server.engine.sampler import Sampler


@dataclass
class EngineConfig:
    n_parallel: int = 4  # slots: sequences running at once
    n_batch: int = 512  # new tokens per step, prefill chunks included
    max_queue: int = 64  # requests that may wait beyond the free slots
    cont_batching: bool = True
    enable_prefix_caching: bool = True
    max_model_len: int | None = None  # default: the executor's, capped at the pool size
    no_perf: bool = False  # skip timing collection
    presample_count: int = -1  # passed to the Sampler


class Engine:
    def __init__(
        self,
        executor: ModelExecutor,
        tokenizer: Tokenizer,
        config: EngineConfig | None = None,
        sampler: Sampler | None = None,
        detokenizer_factory: Callable[[SamplingParams], Detokenizer] | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.executor = executor
        self.tokenizer = tokenizer
        pool_tokens = executor.num_blocks * executor.block_size
        self.max_model_len = min(
            executor.max_model_len, pool_tokens, config.max_model_len or pool_tokens
        )
        self.block_manager = BlockManager(
            executor.num_blocks, executor.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            n_parallel=config.n_parallel,
            n_batch=config.n_batch,
            max_model_len=self.max_model_len,
            max_queue=config.max_queue,
            cont_batching=config.cont_batching,
        )
        if sampler is None:  # imported here so the engine loads without the sampler's deps
            from llama_mpi.mpi_server.engine.sampler import Sampler

            sampler = Sampler(executor.vocab_size, presample_count=config.presample_count)
        self.sampler = sampler
        if detokenizer_factory is None:
            from llama_mpi.models.tokenizer.detokenizer import IncrementalDetokenizer

            def detokenizer_factory(p: SamplingParams) -> Detokenizer:
                return IncrementalDetokenizer(tokenizer, skip_special_tokens=p.skip_special_tokens)

        self.detokenizer_factory = detokenizer_factory
        self.seqs: dict[str, Sequence] = {}  # unfinished requests
        self.last_num_tokens = 0  # tokens in the last step's batch (0: nothing to run)
        # structured outputs (see EngineStats)
        self.constrained_tokens = 0
        self.constrained_step_seconds = 0.0
        self.grammar_seconds = 0.0
        self._constrained_rows = 0

    # -- requests -----------------------------------------------------------------------------

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ``ValueError`` for a request the engine cannot take; changes nothing."""
        self.scheduler.check_prompt(len(prompt_ids))
        params.validate(self.executor.vocab_size)
        if params.n != 1:
            raise ValueError("n: the engine runs one sequence per request; fan out above it")
        bad = [t for t in prompt_ids if not 0 <= t < self.executor.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    checked: bool = False) -> None:
        """Queue a request; ``ValueError`` if invalid, ``EngineFullError`` if the queue is full.
        ``checked``: the caller has run ``check_request`` on it already (no second pass)."""
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        if not checked:
            self.check_request(prompt_ids, params)
        detok = self.detokenizer_factory(params)
        seq = Sequence(request_id, prompt_ids, params, detok, device=self.executor.device,
                       collect_timings=not self.config.no_perf)
        self.scheduler.add(seq)
        self.seqs[request_id] = seq

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request now, freeing its slot and blocks; its final output, or None."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [], "", [])

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        self._constrained_rows = 0
        scheduled = self.scheduler.schedule()
        self.last_num_tokens = sum(s.num_new_tokens for s in scheduled)
        if not scheduled:
            return []
        batch = ForwardBatch.build([s.batch_entry() for s in scheduled], self.executor.block_size)
        logits = self.executor.execute(batch)
        self.scheduler.postprocess(scheduled)
        # A sequence samples once all its tokens are computed: end of prefill, or a decode.
        rows = [i for i, s in enumerate(scheduled) if s.seq.num_uncomputed == 0]
        if not rows:
            return []
        outputs = self._sample_and_emit([scheduled[i] for i in rows], logits, rows)
        if self._constrained_rows:
            self.constrained_step_seconds += time.perf_counter() - t0
        return outputs

    def _sample_and_emit(
        self, done: list[ScheduledSeq], logits: torch.Tensor, rows: list[int]
    ) -> list[RequestOutput]:
        seqs = [s.seq for s in done]
        if len(rows) != logits.shape[0]:
            logits = logits[torch.tensor(rows, device=logits.device)]
        matchers = [q.matcher for q in seqs]
        self._constrained_rows = sum(m is not None for m in matchers)
        result = self.sampler(
            logits,
            [q.params for q in seqs],
            [q.prompt_ids for q in seqs],
            [q.output_ids for q in seqs],
            [q.generator for q in seqs],
            **({"matchers": matchers} if self._constrained_rows else {}),
        )
        if self._constrained_rows:
            self.grammar_seconds += getattr(self.sampler, "last_mask_seconds", 0.0)
            self.constrained_tokens += self._constrained_rows
        token_ids = result.token_ids.tolist()
        outputs = []
        for i, seq in enumerate(seqs):
            tid = int(token_ids[i])
            seq.append_token(tid)
            lps = self._logprobs(seq, tid, result, i)
            error = None
            if seq.matcher is not None:
                t_mask = time.perf_counter()
                if not seq.matcher.accept(tid):
                    error = f"the grammar refused sampled token {tid}: {seq.matcher.error}"
                self.grammar_seconds += time.perf_counter() - t_mask
            reason: str | None
            if error is not None:
                text, reason = self._drain(seq, ""), "error"
            else:
                text, reason = self._check_stop(seq, tid)
            if reason is not None:
                self.scheduler.finish(seq, reason)
                self.seqs.pop(seq.request_id, None)
            outputs.append(self._output(seq, [tid], text, lps, error))
        return outputs

    def _check_stop(self, seq: Sequence, tid: int) -> tuple[str, str | None]:
        """Text to emit for the new token and the finish reason, if it ends the request."""
        p = seq.params
        # under a grammar EOS is only allowed where the output is complete: it always ends
        eos_ends = not p.ignore_eos or seq.matcher is not None
        if (tid in self.tokenizer.eos_ids and eos_ends) or tid in p.stop_token_ids:
            return self._drain(seq, ""), "stop"  # the stop token itself is not text
        text, hit = seq.stop_checker.feed(seq.detokenizer.add(tid))
        if hit:
            return text, "stop"
        if seq.matcher is not None and seq.matcher.is_terminated():
            return self._drain(seq, text), "stop"  # only EOS may follow: done, no extra step
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return self._drain(seq, text), "length"
        return text, None

    @staticmethod
    def _drain(seq: Sequence, text: str) -> str:
        """Finishing, not on a stop string: release the text both stages still hold."""
        more, _ = seq.stop_checker.feed(seq.detokenizer.flush())
        return text + more + seq.stop_checker.flush()

    def _logprobs(self, seq: Sequence, tid: int, result, i: int) -> list[TokenLogprob]:
        p = seq.params
        if not (p.logprobs or p.top_logprobs) or result.logprobs is None:
            return []
        top: list[tuple[int, str, float]] = []
        if p.top_logprobs and result.top_ids is not None:
            ids = result.top_ids[i, : p.top_logprobs].tolist()
            lps = result.top_logprobs[i, : p.top_logprobs].tolist()
            top = [(t, self._token_text(t), lp) for t, lp in zip(ids, lps, strict=True)
                   if lp != float("-inf")]  # a grammar left fewer tokens than asked for
        return [TokenLogprob(tid, self._token_text(tid), float(result.logprobs[i]), top)]

    def _token_text(self, tid: int) -> str:
        text = self.tokenizer.decode([tid], skip_special_tokens=False)
        return self.tokenizer.id_to_token(tid) if "\ufffd" in text else text

    def _output(
        self,
        seq: Sequence,
        new_ids: list[int],
        text: str,
        logprobs: list[TokenLogprob],
        error: str | None = None,
    ) -> RequestOutput:
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_text=text,
            logprobs=logprobs,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=seq.num_prompt_tokens,
            completion_tokens=seq.num_output_tokens,
            cached_prompt_tokens=seq.num_cached_prompt,
            error=error,
        )
        t = seq.timings
        arrival, scheduled, first, done = t.arrival, t.first_scheduled, t.first_token, t.finished
        if (out.finished and arrival is not None and scheduled is not None and first is not None
                and done is not None):  # t.complete, in a form the type checker follows
            out.time_to_first_token = first - arrival
            out.prompt_seconds = first - scheduled
            out.decode_seconds = done - first
        return out

    # -- introspection ------------------------------------------------------------------------

    def slots(self) -> list[SlotInfo]:
        infos = []
        for i, seq in enumerate(list(self.scheduler.slots)):
            if seq is None:
                infos.append(SlotInfo(i, None, "idle", 0, 0))
            else:
                state = "prefill" if seq.in_prefill else "decode"
                infos.append(
                    SlotInfo(i, seq.request_id, state, seq.num_prompt_tokens, seq.num_output_tokens)
                )
        return infos

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            queue_length=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            prefix_cache_hits=bm.prefix_hits,
            prefix_cache_queries=bm.prefix_queries,
            constrained_tokens=self.constrained_tokens,
            constrained_step_seconds=self.constrained_step_seconds,
            grammar_seconds=self.grammar_seconds,
        )
