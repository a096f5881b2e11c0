"""What the engine hands back to the HTTP layer, one increment at a time."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class RequestOutput:
    """One step's news for a request: the tokens and text generated since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # never ends inside a UTF-8 character or a possible stop string
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per new token, if asked
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    error: str | None = None
    # timings (seconds), filled on the last output unless perf collection is off
    time_to_first_token: float | None = None
    prompt_seconds: float | None = None
    decode_seconds: float | None = None
