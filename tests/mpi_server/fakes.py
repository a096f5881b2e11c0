"""Fakes for engine unit tests: an executor that checks every batch, a tiny tokenizer.

``FakeExecutor`` keeps its own copy of the KV pool (the token and position written to every
slot) and computes each logits row from the context it *reads back through the block
table*, so a scheduler or prefix-cache bug (stale block, wrong slot, shared block
overwritten) changes the outputs instead of passing silently.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.mpi_server.engine.executor import ModelExecutor
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams


def context_seed(tokens: list[int]) -> int:
    digest = hashlib.blake2b(array("q", tokens).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class FakeExecutor(ModelExecutor):
    def __init__(
        self,
        vocab_size: int = 64,
        num_blocks: int = 64,
        block_size: int = 4,
        max_model_len: int = 256,
        next_token: Callable[[list[int]], int] | None = None,
        banned: tuple[int, ...] = (),
    ) -> None:
        self.vocab_size = vocab_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = torch.device("cpu")
        self.next_token = next_token  # scripted model; default: pseudo-random from the context
        self.banned = banned  # token ids never chosen (e.g. EOS, to get full-length outputs)
        n = num_blocks * block_size
        self.pool_tok = [-1] * n
        self.pool_pos = [-1] * n
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.fail_on_call: int | None = None
        self.shut_down = False

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        self.calls += 1
        if self.fail_on_call is not None and self.calls >= self.fail_on_call:
            raise RuntimeError("rank 3 died")
        self.batch_sizes.append(batch.num_tokens)
        bs = self.block_size
        qs = batch.query_start.tolist()
        ctx = batch.context_lens.tolist()
        pos = batch.positions.tolist()
        slots = batch.slot_mapping.tolist()
        ids = batch.input_ids.tolist()
        assert qs[0] == 0 and qs[-1] == batch.num_tokens, qs
        written: dict[int, int] = {}  # slot -> sequence
        tables = []
        for b in range(batch.num_seqs):
            q = qs[b + 1] - qs[b]
            assert q >= 1 and ctx[b] <= self.max_model_len, (q, ctx[b])
            table = batch.block_tables[b, : -(-ctx[b] // bs)].tolist()
            assert all(0 <= t < self.num_blocks for t in table), table
            assert len(set(table)) == len(table), f"block repeated in a table: {table}"
            tables.append(table)
            for r in range(qs[b], qs[b + 1]):
                p = ctx[b] - q + (r - qs[b])
                assert pos[r] == p, f"row {r}: position {pos[r]} != {p}"
                assert slots[r] == table[p // bs] * bs + p % bs, f"row {r}: bad slot"
                assert slots[r] not in written, f"slot {slots[r]} written twice"
                written[slots[r]] = b
        for b, table in enumerate(tables):  # a block one sequence writes, no other may read
            for blk in table:
                writers = {written[s] for s in range(blk * bs, blk * bs + bs) if s in written}
                assert writers <= {b}, f"block {blk} written by {writers} but read by {b}"
        for r, s in enumerate(slots):
            self.pool_tok[s], self.pool_pos[s] = ids[r], pos[r]
        rows = batch.logits_indices.tolist()
        out = torch.empty(len(rows), self.vocab_size)
        for i, r in enumerate(rows):
            b = max(j for j in range(batch.num_seqs) if qs[j] <= r)
            context = []
            for p in range(pos[r] + 1):
                s = tables[b][p // bs] * bs + p % bs
                assert self.pool_pos[s] == p, f"seq {b} reads a stale slot {s} at position {p}"
                context.append(self.pool_tok[s])
            out[i] = self.logits_for(context)
        return out

    def logits_for(self, context: list[int]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(context_seed(context))
        logits = torch.randn(self.vocab_size, generator=gen)
        if self.next_token is not None:
            logits[self.next_token(context)] = 20.0
        for t in self.banned:
            logits[t] = -1e9
        return logits

    def shutdown(self) -> None:
        self.shut_down = True


# Token 0: BOS, 1: EOS (special); then word pieces; the rest "t<i>" pieces.
PIECES = ["<s>", "</s>", "he", "llo", " wor", "ld", "!", " a", "b", "c", "STOP", "\n"]


class FakeTokenizer:
    def __init__(self, vocab_size: int = 64) -> None:
        self.pieces = PIECES + [f" t{i}" for i in range(len(PIECES), vocab_size)]
        self.vocab_size = vocab_size
        self.bos_id = 0
        self.eos_id = 1
        self.eos_ids = {1}
        self.special = {0, 1}

    def id_to_token(self, i: int) -> str:
        return self.pieces[i]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(
            self.pieces[i] for i in ids if not (skip_special_tokens and i in self.special)
        )

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True):
        ids = [self.bos_id] if add_bos else []
        while text:  # longest match, good enough for tests
            i = max(
                (j for j, p in enumerate(self.pieces) if p and text.startswith(p)),
                key=lambda j: len(self.pieces[j]),
            )
            ids.append(i)
            text = text[len(self.pieces[i]) :]
        return ids


class FakeDetokenizer:
    def __init__(self, tokenizer: FakeTokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.text = ""

    def add(self, token_id: int) -> str:
        piece = self.tokenizer.decode([token_id], skip_special_tokens=self.skip)
        self.text += piece
        return piece

    def flush(self) -> str:
        return ""


@dataclass
class FakeSampleResult:
    token_ids: torch.Tensor
    logprobs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_logprobs: torch.Tensor | None


class FakeSampler:
    """Greedy, or plain temperature sampling with the request's generator."""

    def __init__(self, vocab_size: int, presample_count: int = -1) -> None:
        self.vocab_size = vocab_size
        self.calls: list[int] = []  # rows per call

    def __call__(self, logits, params: list[SamplingParams], prompt_ids, output_ids, generators):
        self.calls.append(logits.shape[0])
        lp = torch.log_softmax(logits.float(), dim=-1)
        ids = []
        for i, p in enumerate(params):
            if p.greedy:
                ids.append(int(lp[i].argmax()))
            else:
                probs = torch.softmax(logits[i] / p.temperature, dim=-1)
                ids.append(int(torch.multinomial(probs, 1, generator=generators[i])))
        token_ids = torch.tensor(ids, dtype=torch.int64)
        k = max((p.top_logprobs for p in params), default=0)
        want = any(p.logprobs or p.top_logprobs for p in params)
        top = lp.topk(k, dim=-1) if k else None
        return FakeSampleResult(
            token_ids,
            lp.gather(1, token_ids[:, None])[:, 0] if want else None,
            top.indices if top is not None else None,
            top.values if top is not None else None,
        )


def make_engine(executor: FakeExecutor | None = None, **config):
    """An ``Engine`` over the fakes; ``config`` goes to ``EngineConfig``."""
    from llama_mpi.mpi_server.engine.engine import Engine, EngineConfig

    executor = executor or FakeExecutor()
    tok = FakeTokenizer(executor.vocab_size)
    return Engine(
        executor,
        tok,
        EngineConfig(**config),
        sampler=FakeSampler(executor.vocab_size),
        detokenizer_factory=lambda p: FakeDetokenizer(tok, p.skip_special_tokens),
    )


def run_to_completion(engine, requests: dict[str, tuple[list[int], SamplingParams]]):
    """Submit all, step until done; per request: (token ids, text, final output)."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    ids: dict[str, list[int]] = {rid: [] for rid in requests}
    text: dict[str, str] = {rid: "" for rid in requests}
    final = {}
    for _ in range(100_000):
        if not engine.has_unfinished():
            break
        for out in engine.step():
            ids[out.request_id] += out.new_token_ids
            text[out.request_id] += out.new_text
            if out.finished:
                final[out.request_id] = out
    assert not engine.has_unfinished()
    return {rid: (ids[rid], text[rid], final[rid]) for rid in requests}
