"""llama.cpp server endpoints: /health, /completion, /tokenize, /detokenize, /slots."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict

from llama_mpi.mpi_server.http import serving
from llama_mpi.mpi_server.http import structured as so
from llama_mpi.mpi_server.http.errors import APIError
from llama_mpi.mpi_server.http.generation import Choice, Generation
from llama_mpi.mpi_server.http.limits import check_text_length
from llama_mpi.mpi_server.http.openai_format import new_id
from llama_mpi.mpi_server.http.protocol import Prompt, SamplingFields, Text, _Request
from llama_mpi.mpi_server.http.sampling import pick_max_tokens
from llama_mpi.mpi_server.http.sse import EventStream, sse
from llama_mpi.mpi_server.http.state import ServerState, get_state

router = APIRouter()


class LlamaCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")
    prompt: Prompt
    stream: bool = False
    n_probs: int = 0  # top alternatives per token
    model: Text | None = None


class TokenizeRequest(_Request):
    content: Text
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Request):
    tokens: list[int]


@router.get("/health")
async def health(state: ServerState = Depends(get_state)) -> JSONResponse:
    """200 only while requests can be served: 503 while loading, draining, or when the engine
    reports a fault (llama.cpp's error shape, with the engine's reason)."""
    if state.draining:
        return JSONResponse({"status": "shutting_down"}, status_code=503)
    if not state.ready:
        return JSONResponse({"status": "loading"}, status_code=503)
    reason = state.engine_health()
    if reason is not None:
        return JSONResponse(
            {"error": {"code": 503, "message": reason, "type": "unavailable_error"}},
            status_code=503)
    return JSONResponse({"status": "ok"})


def _stop_type(c: Choice) -> str:
    if c.finish_reason == "length":
        return "limit"
    return "eos" if c.finish_reason == "stop" else (c.finish_reason or "none")


def _final(state: ServerState, c: Choice, prompt_len: int, content: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "content": content,
        "id_slot": -1,
        "stop": True,
        "model": state.model_name,
        "tokens_predicted": c.completion_tokens,
        "tokens_evaluated": c.prompt_tokens or prompt_len,
        "tokens_cached": c.cached_tokens,
        "stop_type": _stop_type(c),
        "truncated": False,
    }
    if not state.no_perf:
        out["timings"] = serving.timings(c)
    return out


def _probs(c_lp: list[Any]) -> list[dict[str, Any]]:
    return [{"id": lp.token_id, "token": lp.text, "logprob": lp.logprob,
             "top_logprobs": [{"id": i, "token": t, "logprob": v} for i, t, v in lp.top]}
            for lp in c_lp]


@router.post("/completion")
@router.post("/completions")
async def completion(
    body: LlamaCompletionRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    serving.admit(state, body)
    spec = so.format_spec(body)
    prompt_ids = await serving.prompt_to_ids(request, state, body.prompt)
    compiled = await so.compile_spec(request, state, spec)
    fields = body.model_dump(exclude={"prompt", "n", "response_format", "json_schema"})
    fields["logprobs"] = body.n_probs > 0
    fields["top_logprobs"] = body.n_probs
    # llama.cpp's default n_predict is -1 (no limit); max_tokens is accepted too.
    limit = pick_max_tokens(("n_predict", body.n_predict), ("max_tokens", body.max_tokens))
    gen = await serving.launch(request, state, prompt_ids, fields, limit, new_id("cmpl"),
                               constraint=compiled, choices=False)
    if body.stream:
        stream = _stream(state, gen, len(prompt_ids), body.n_probs > 0)
        return EventStream(stream, on_close=gen.close)
    (c,) = await serving.collect(request, gen)
    if state.display_chat:
        serving.show_exchange(body.prompt, [c])
    out = _final(state, c, len(prompt_ids), c.text)
    if body.n_probs > 0:
        out["completion_probabilities"] = _probs(c.logprobs)
    return out


async def _stream(
    state: ServerState, gen: Generation, prompt_len: int, probs: bool
) -> AsyncIterator[bytes]:
    # llama.cpp streams {"content", "stop": false} pieces, then one final object; no [DONE].
    try:
        async for c, out in gen.events():
            if out.finished:
                serving.raise_if_failed([c])
                final = _final(state, c, prompt_len, out.new_text)
                if probs:
                    final["completion_probabilities"] = _probs(out.logprobs)
                yield sse(final)
            elif out.new_text or out.logprobs:
                piece: dict[str, Any] = {"content": out.new_text, "stop": False}
                if probs:
                    piece["completion_probabilities"] = _probs(out.logprobs)
                yield sse(piece)
    except APIError as exc:
        yield sse(exc.body())
    finally:
        await gen.close()


def _pieces(tokenizer: Any, ids: list[int]) -> list[dict[str, Any]]:
    return [{"id": t, "piece": tokenizer.decode([t], skip_special_tokens=False)} for t in ids]


@router.post("/tokenize")
async def tokenize(
    body: TokenizeRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    state.require_engine()
    check_text_length(len(body.content), state.max_model_len, "content")
    ids = list(await serving.off_loop(request, state, state.tokenizer.encode, body.content,
                                      body.add_special, body.parse_special))
    if not body.with_pieces:
        return {"tokens": ids}
    return {"tokens": await serving.off_loop(request, state, _pieces, state.tokenizer, ids)}


@router.post("/detokenize")
async def detokenize(
    body: DetokenizeRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    state.require_engine()
    serving.check_ids(state, body.tokens, "tokens", prompt=False)
    text = await serving.off_loop(request, state, state.tokenizer.decode, body.tokens, False)
    return {"content": text}


@router.get("/slots")
async def slots(state: ServerState = Depends(get_state)) -> Any:
    engine = state.require_engine()
    try:
        infos = engine.slots()
    except Exception as exc:
        raise APIError(500, f"slots unavailable: {exc}", type="server_error") from exc
    return [
        {"id": s.id, "id_task": s.request_id, "state": s.state,
         "is_processing": s.state != "idle", "n_ctx": state.max_model_len,
         "n_prompt_tokens": s.n_prompt_tokens, "n_decoded": s.n_generated}
        for s in infos
    ]
