"""LightLLM endpoints: POST /generate and POST /generate_stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import Field

from llama_mpi.mpi_server.http import serving
from llama_mpi.mpi_server.http.errors import APIError
from llama_mpi.mpi_server.http.generation import Generation
from llama_mpi.mpi_server.http.openai_format import new_id
from llama_mpi.mpi_server.http.protocol import FiniteFloat, Text, _Request
from llama_mpi.mpi_server.http.sse import EventStream, sse
from llama_mpi.mpi_server.http.state import ServerState, get_state

router = APIRouter()


class LightParameters(_Request):
    max_new_tokens: int = 16
    do_sample: bool = False  # LightLLM: greedy unless asked to sample
    temperature: FiniteFloat = 1.0
    top_p: FiniteFloat = 1.0
    top_k: int = -1
    repetition_penalty: FiniteFloat = 1.0
    presence_penalty: FiniteFloat = 0.0
    frequency_penalty: FiniteFloat = 0.0
    stop_sequences: Text | list[Text] | None = None
    seed: int | None = None
    ignore_eos: bool = False


class GenerateRequest(_Request):
    inputs: Text
    parameters: LightParameters = Field(default_factory=LightParameters)


async def _prepare(
    body: GenerateRequest, request: Request, state: ServerState, logprobs: bool
) -> tuple[Generation, int]:
    state.live_engine()  # 503 at once, before any tokenizing, when nothing can be served
    prompt_ids = await serving.prompt_to_ids(request, state, body.inputs, "inputs")
    p = body.parameters
    fields: dict[str, Any] = p.model_dump(exclude={"max_new_tokens", "stop_sequences"})
    fields["stop"] = p.stop_sequences
    fields["logprobs"] = logprobs
    if not p.do_sample:
        fields["temperature"] = 0.0
    gen = await serving.launch(request, state, prompt_ids, fields,
                               ("max_new_tokens", p.max_new_tokens), new_id("gen"),
                               prompt_param="inputs", choices=False)
    return gen, len(prompt_ids)


@router.post("/generate")
async def generate(
    body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    gen, _ = await _prepare(body, request, state, logprobs=False)
    (c,) = await serving.collect(request, gen)
    if state.display_chat:
        serving.show_exchange(body.inputs, [c])
    return {"generated_text": [c.text], "count_output_tokens": c.completion_tokens,
            "finish_reason": c.finish_reason}


@router.post("/generate_stream")
async def generate_stream(
    body: GenerateRequest, request: Request, state: ServerState = Depends(get_state)
) -> Any:
    gen, _ = await _prepare(body, request, state, logprobs=True)
    eos = getattr(state.tokenizer, "eos_id", None)
    return EventStream(_stream(state, gen, body.inputs, eos), on_close=gen.close)


async def _stream(
    state: ServerState, gen: Generation, inputs: str, eos: int | None
) -> AsyncIterator[bytes]:
    # One event per token. An output's text is not split per token (a stop string or a UTF-8
    # character may span tokens), so it rides on that output's last token.
    try:
        async for c, out in gen.events():
            if out.finished:
                serving.raise_if_failed([c])
            ids = out.new_token_ids or ([] if not out.finished else [-1])
            for k, tok in enumerate(ids):
                last = k == len(ids) - 1
                lp = out.logprobs[k].logprob if k < len(out.logprobs) else 0.0
                done = out.finished and last
                yield sse({
                    "token": {"id": tok, "text": out.new_text if last else "",
                              "logprob": max(lp, -9999.0), "special": tok == eos or tok < 0},
                    "generated_text": c.text if done else None,
                    "finished": done,
                    "finish_reason": c.finish_reason if done else None,
                    "details": None,
                })
        if state.display_chat:
            serving.show_exchange(inputs, gen.choices)
    except APIError as exc:
        yield sse(exc.body())
    finally:
        await gen.close()
