"""Steps every generating route shares: prompt -> ids, start, collect, fail cleanly, show."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from starlette.requests import Request

from llama_mpi.mpi_server.http.errors import APIError, bad_request
from llama_mpi.mpi_server.http.generation import (
    Choice,
    ClientGone,
    Generation,
    unless_disconnected,
)
from llama_mpi.mpi_server.http.limits import check_ids_length, check_text_length
from llama_mpi.mpi_server.http.protocol import unsupported_fields
from llama_mpi.mpi_server.http.sampling import build_params, per_choice
from llama_mpi.mpi_server.http.state import ServerState

CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never delivered
T = TypeVar("T")


async def off_loop(request: Request, state: ServerState, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` (tokenizing, detokenizing, a chat template) off the event loop; if the
    client leaves first, the answer is not waited for (499), and a job not yet started is
    dropped. A running tokenizer call cannot be interrupted: it finishes, unseen."""
    try:
        return await unless_disconnected(request, state.in_thread(fn, *args))
    except ClientGone:
        raise APIError(CLIENT_GONE, "client closed request") from None


def check_ids(state: ServerState, ids: list[int], param: str, prompt: bool = True) -> None:
    check_ids_length(len(ids), state.max_model_len, param, prompt=prompt)
    bad = next((t for t in ids if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise bad_request(f"{param}: token id {bad} is outside the vocabulary", param)


async def prompt_to_ids(
    request: Request, state: ServerState, prompt: Any, param: str = "prompt",
    add_bos: bool | None = None,
) -> list[int]:
    """A string, a list of token ids, or a one-element list of either -> token ids.

    Too long a prompt is refused before any tokenizing (see ``limits``)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad_request(f"{param}: batched prompts are not supported; send one per request",
                              param)
        prompt = prompt[0]
    if isinstance(prompt, str):
        check_text_length(len(prompt), state.max_model_len, param)
        ids = await off_loop(request, state, state.tokenizer.encode, prompt, add_bos)
    else:
        ids = list(prompt)
        check_ids(state, ids, param)
    if not ids:
        raise bad_request(f"{param}: must not be empty", param)
    return list(ids)


def admit(state: ServerState, body: Any) -> None:
    """Before any work: 503 if nothing can be served, the model name, and fields that would
    change the reply but are not implemented here (400 naming them, not silently ignored)."""
    state.live_engine()
    state.check_model(getattr(body, "model", None))
    found = unsupported_fields(body)
    if found is not None:
        name, why = found
        raise bad_request(f"{name}: not supported by this server ({why})", param=name,
                          code="unsupported_parameter")


async def launch(
    request: Request, state: ServerState, prompt_ids: list[int], fields: dict[str, Any],
    limit: tuple[str, int | None], rid: str, *, prompt_param: str = "prompt",
    constraint: Any = None, choices: bool = True,
) -> Generation:
    """What every dialect does once it has the prompt: check the sampling fields against it
    (``build_params``), split ``n`` into choices, submit them. ``fields`` holds request
    values by ``SamplingParams`` name; special tokens are hidden unless the server shows
    them (``--special``) or the route says otherwise."""
    engine = state.live_engine()
    fields.setdefault("skip_special_tokens", not state.special)
    params = build_params(fields, max_tokens=limit, prompt_len=len(prompt_ids),
                          max_model_len=state.max_model_len, vocab_size=state.vocab_size,
                          prompt_param=prompt_param)
    params.constraint = constraint
    gen = Generation(engine, state.metrics, rid, prompt_ids,
                     per_choice(params) if choices else [params], timed=not state.no_perf)
    await start(request, gen)
    return gen


async def start(request: Request, gen: Generation) -> None:
    """Submit every choice; engine refusals become HTTP errors before any byte is sent."""
    try:
        await unless_disconnected(request, gen.start())
    except ClientGone:
        await gen.close()
        raise APIError(CLIENT_GONE, "client closed request") from None


async def collect(request: Request, gen: Generation) -> list[Choice]:
    try:
        choices = await unless_disconnected(request, gen.collect())
    except ClientGone:
        raise APIError(CLIENT_GONE, "client closed request") from None
    finally:
        await gen.close()
    raise_if_failed(choices)
    return choices


def raise_if_failed(choices: list[Choice]) -> None:
    for c in choices:
        if c.error is not None:
            raise APIError(500, f"Generation failed: {c.error}", type="server_error")


def show_exchange(prompt: Any, choices: list[Choice]) -> None:
    """``--display-chat``: echo the exchange on the console (stdout, flushed)."""
    lines = ["----- request -----"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        lines += [f"[{m.get('role')}] {m.get('content')}" for m in prompt]
    else:
        lines.append(str(prompt))
    for c in choices:
        lines.append(f"----- reply {c.index} ({c.finish_reason}) -----")
        lines.append(c.text)
    print("\n".join(lines), file=sys.stdout, flush=True)


def timings(choice: Choice) -> dict[str, float]:
    """llama.cpp's ``timings`` object."""
    prompt_n = max(choice.prompt_tokens - choice.cached_tokens, 0)
    prompt_s = choice.prompt_seconds() or 0.0
    predicted_n = choice.completion_tokens
    decode_s = choice.decode_seconds() or 0.0
    return {
        "prompt_n": prompt_n,
        "prompt_ms": prompt_s * 1e3,
        "prompt_per_token_ms": prompt_s * 1e3 / prompt_n if prompt_n else 0.0,
        "prompt_per_second": prompt_n / prompt_s if prompt_s > 0 else 0.0,
        "predicted_n": predicted_n,
        "predicted_ms": decode_s * 1e3,
        "predicted_per_token_ms": decode_s * 1e3 / predicted_n if predicted_n else 0.0,
        "predicted_per_second": predicted_n / decode_s if decode_s > 0 else 0.0,
    }
