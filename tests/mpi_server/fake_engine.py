"""A scripted AsyncEngineAPI, byte tokenizer and chat template for HTTP-layer tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llama_mpi.mpi_server.engine.engine_api import (
    AsyncEngineAPI,
    EngineDeadError,
    EngineFullError,
    EngineStats,
    SlotInfo,
)
from llama_mpi.mpi_server.engine.outputs import RequestOutput, TokenLogprob
from llama_mpi.mpi_server.engine.sampling_params import SamplingParams

BOS, EOS, OFFSET = 1, 2, 3  # token id = byte + OFFSET
VOCAB = 256 + OFFSET


class FakeTokenizer:
    vocab_size = VOCAB
    bos_id = BOS
    eos_id = EOS

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        ids = [b + OFFSET for b in text.encode()]
        return ([BOS] if add_bos is None or add_bos else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        special = {0: "<unk>", BOS: "<s>", EOS: "</s>"}
        out, raw = [], bytearray()
        for t in ids:
            if t in special:
                if not skip_special_tokens:
                    out.append(raw.decode(errors="replace") + special[t])
                    raw = bytearray()
            else:
                raw.append(t - OFFSET)
        return "".join(out) + raw.decode(errors="replace")


def fake_chat_to_ids(messages: list[dict[str, Any]]) -> list[int]:
    if not messages:
        raise ValueError("no messages")
    text = ""
    for m in messages:
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"unknown role {m['role']!r}")
        text += f"<|{m['role']}|>{m['content']}\n"
    return FakeTokenizer().encode(text + "<|assistant|>")


class FakeEngine(AsyncEngineAPI):
    """Replies "Hello from fake" (+ " #<seed>"), one token per output, then EOS."""

    def __init__(self, max_model_len: int = 256, token_delay: float = 0.0) -> None:
        self.max_model_len = max_model_len
        self.token_delay = token_delay
        self.full = False
        self.dead = False
        self.fail_midway = False  # finish with finish_reason="error" after one token
        self.unhealthy: str | None = None  # what health() reports
        self.calls: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: list[str] = []
        self.closed_unfinished: list[str] = []
        self.running: set[str] = set()
        self.shut_down = False

    def reply(self, params: SamplingParams) -> str:
        return "Hello from fake" + ("" if params.seed is None else f" #{params.seed}")

    async def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("rank 1 died")
        if self.full:
            raise EngineFullError("queue full")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError("prompt: too long")
        if params.seed is not None and not -(1 << 63) <= params.seed < 1 << 64:
            # torch.Generator.manual_seed's error, a 500 from the real engine.
            raise RuntimeError("Overflow when unpacking long long")
        self.calls.append((request_id, list(prompt_ids), params))
        self.running.add(request_id)
        text, n, finished = "", 0, False
        target = self.reply(params)
        try:
            while True:
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                else:
                    await asyncio.sleep(0)
                if n < len(target):
                    ch = target[n]
                elif params.ignore_eos:
                    ch = "."
                else:
                    ch = None
                base = dict(request_id=request_id, prompt_tokens=len(prompt_ids),
                            cached_prompt_tokens=2)
                if ch is None:  # EOS: no visible token text
                    finished = True
                    yield RequestOutput(new_token_ids=[EOS], new_text="", finished=True,
                                        finish_reason="stop", completion_tokens=n + 1,
                                        **base, time_to_first_token=0.01, decode_seconds=0.02)
                    return
                n += 1
                text += ch
                tok = ord(ch) + OFFSET
                lps = []
                if params.logprobs:
                    top = [(tok, ch, -0.25), (OFFSET + 65, "A", -1.5), (OFFSET + 66, "B", -2.0)]
                    lps = [TokenLogprob(tok, ch, -0.25, top[: params.top_logprobs])]
                reason = None
                if any(s in text for s in params.stop):
                    reason, ch = "stop", ""
                elif n >= params.max_tokens:
                    reason = "length"
                elif self.fail_midway:
                    reason = "error"
                finished = reason is not None
                yield RequestOutput(new_token_ids=[tok], new_text=ch, logprobs=lps,
                                    finished=finished, finish_reason=reason, completion_tokens=n,
                                    error="boom" if reason == "error" else None, **base)
                if finished:
                    return
        finally:
            self.running.discard(request_id)
            if not finished:
                self.closed_unfinished.append(request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def health(self) -> str | None:
        return self.unhealthy

    def slots(self) -> list[SlotInfo]:
        return [SlotInfo(0, None, "idle", 0, 0), SlotInfo(1, "r1", "decode", 5, 3)]

    def stats(self) -> EngineStats:
        return EngineStats(queue_length=3, running=len(self.running), kv_blocks_total=100,
                           kv_blocks_used=25, prefix_cache_hits=7, prefix_cache_queries=10)

    async def shutdown(self, drain_timeout: float = 10.0) -> None:
        self.shut_down = True


def make_app(engine: FakeEngine | None = None, **kw: Any) -> Any:
    from llama_mpi.mpi_server.http import create_app

    engine = engine or FakeEngine()
    opts: dict[str, Any] = dict(model_name="fake-model", api_key=None, vocab_size=VOCAB,
                                max_model_len=engine.max_model_len,
                                model_aliases=("fake.gguf",))
    opts.update(kw)
    return create_app(engine, FakeTokenizer(), fake_chat_to_ids, **opts)
