"""OpenAI response shapes: chat / legacy logprobs, usage, and chunk envelopes."""

from __future__ import annotations

import time
import uuid
from typing import Any

from llama_mpi.mpi_server.engine.outputs import TokenLogprob
from llama_mpi.mpi_server.http.generation import Choice


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number, so clamp like vLLM does.
    return max(float(x), -9999.0)


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    return {
        "content": [
            {
                "token": lp.text,
                "logprob": _finite(lp.logprob),
                "bytes": _bytes(lp.text),
                "top_logprobs": [
                    {"token": t, "logprob": _finite(v), "bytes": _bytes(t)} for _, t, v in lp.top
                ],
            }
            for lp in items
        ]
    }


def legacy_logprobs(items: list[TokenLogprob], start_offset: int = 0) -> dict[str, Any]:
    """Completions format: parallel lists; ``text_offset`` counts characters of the output."""
    offsets, pos = [], start_offset
    for lp in items:
        offsets.append(pos)
        pos += len(lp.text)
    return {
        "tokens": [lp.text for lp in items],
        "token_logprobs": [_finite(lp.logprob) for lp in items],
        "top_logprobs": [{t: _finite(v) for _, t, v in lp.top} for lp in items],
        "text_offset": offsets,
    }


def usage(choices: list[Choice], prompt_len: int) -> dict[str, Any]:
    prompt = max((c.prompt_tokens for c in choices), default=0) or prompt_len
    completion = sum(c.completion_tokens for c in choices)
    cached = max((c.cached_tokens for c in choices), default=0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def envelope(rid: str, obj: str, created: int, model: str, choices: list[Any]) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
