"""End to end against one real ``llama-server`` subprocess serving the tiny random model:
the OpenAI client's view of every endpoint, greedy parity with offline ``generate``,
concurrency, the prefix cache, client disconnects, a streaming load test, and bad input."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.mpi_server.server_process import build_tiny_model, running_server

# One decode thread (the tests share two CPU cores with the test process itself); the API
# serves the model as "tiny".
SERVER_ARGS = ("-t", "1", "-a", "tiny")
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("e2e-model"))


@pytest.fixture(scope="module")
def url(model_path: Path) -> Iterator[str]:
    with running_server(model_path, *SERVER_ARGS) as base:
        yield base


@pytest.fixture(scope="module")
def client(url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@dataclass
class Offline:
    """The offline reference: the model and tokenizer loaded in this process."""

    model: Any
    tokenizer: Any

    def greedy(self, prompt_ids: list[int], n: int) -> tuple[list[int], str]:
        """``n`` greedy tokens after ``prompt_ids`` and their text."""
        import torch

        from tests.models.reference_decode import generate

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # much faster than 2 threads on two busy cores
        try:
            ids, _, _ = generate(self.model, prompt_ids, n)
        finally:
            torch.set_num_threads(threads)
        return ids, self.tokenizer.decode(ids)


@pytest.fixture(scope="module")
def offline(model_path: Path) -> Offline:
    from llama_mpi.models.loader import load_model
    from llama_mpi.models.tokenizer.tokenizer import Tokenizer

    return Offline(load_model(str(model_path)), Tokenizer.from_gguf(str(model_path)))


def metric(http: httpx.Client, name: str) -> float:
    """Sum of the samples called ``name`` (e.g. ``llama_mpi_running_requests``)."""
    text = http.get("/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name)


def complete(client: OpenAI, prompt: str | list[int], max_tokens: int) -> Any:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                     **GREEDY)


def long_prompt(tag: str, words: int) -> str:
    return " ".join(f"{tag}{i % 7}" for i in range(words))


# --- the OpenAI surface ----------------------------------------------------------------------


def test_chat_completion(client: OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, **GREEDY)
    assert r.object == "chat.completion"
    (choice,) = r.choices
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0


def test_text_completion(client: OpenAI) -> None:
    r = complete(client, "Once upon a time", 8)
    assert r.object == "text_completion"
    (choice,) = r.choices
    assert choice.text and choice.finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8


def test_streamed_chat_concatenates_to_the_greedy_text(client: OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16, **GREEDY)
    stream = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=16,
                                            stream=True, **GREEDY)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_logprobs(client: OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, logprobs=True,
                                       top_logprobs=3, **GREEDY)
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content) == 6
    for item in lp.content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        tops = [t.logprob for t in item.top_logprobs]
        assert all(v <= 0 for v in tops) and tops == sorted(tops, reverse=True)
        assert item.logprob == pytest.approx(tops[0], abs=1e-4)  # greedy picks the best


def test_n_returns_that_many_choices(client: OpenAI) -> None:
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, n=2,
                                       temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 8


def _sampled(client: OpenAI, seed: int) -> str:
    r = client.completions.create(model="tiny", prompt="The weather", max_tokens=8,
                                  temperature=1.0, seed=seed, extra_body={"ignore_eos": True})
    return r.choices[0].text


def test_same_seed_same_text(client: OpenAI) -> None:
    assert _sampled(client, 1234) == _sampled(client, 1234)


def test_different_seeds_differ(client: OpenAI) -> None:
    base = _sampled(client, 1234)
    assert any(_sampled(client, seed) != base for seed in (1, 2, 3))


# --- greedy parity with the offline reference ------------------------------------------------


def test_greedy_token_prompt_matches_offline_generate(client: OpenAI, offline: Offline) -> None:
    prompt = [5, 17, 250, 3, 99, 41, 7, 300, 12, 64]
    ids, text = offline.greedy(prompt, 24)
    r = complete(client, prompt, 24)
    assert r.choices[0].text == text
    assert r.usage is not None and r.usage.completion_tokens == len(ids) == 24
    assert r.usage.prompt_tokens == len(prompt)


def test_greedy_text_prompt_matches_offline_generate(client: OpenAI, offline: Offline) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    prompt_ids = offline.tokenizer.encode(prompt)
    ids, text = offline.greedy(prompt_ids, 24)
    r = complete(client, prompt, 24)
    assert r.choices[0].text == text
    assert r.usage is not None and r.usage.completion_tokens == len(ids) == 24
    assert r.usage.prompt_tokens == len(prompt_ids)


# --- concurrency -----------------------------------------------------------------------------


def test_concurrent_greedy_equals_sequential(client: OpenAI, url: str) -> None:
    prompts = [f"Request {i}: " + "abc " * (i % 5) for i in range(16)]
    alone = [complete(client, p, 16).choices[0].text for p in prompts]

    async def together() -> list[str]:
        async with AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0,
                               timeout=60) as ac:
            rs = await asyncio.gather(*(
                ac.completions.create(model="tiny", prompt=p, max_tokens=16, **GREEDY)
                for p in prompts))
        return [r.choices[0].text for r in rs]

    assert asyncio.run(together()) == alone


# --- prefix cache ----------------------------------------------------------------------------


def test_repeated_long_prompt_hits_the_prefix_cache(client: OpenAI, http: httpx.Client) -> None:
    prompt = long_prompt("cache", 100)
    hits = "llama_mpi_prefix_cache_hit_tokens_total"
    first = complete(client, prompt, 8)
    assert first.usage is not None and first.usage.prompt_tokens >= 180
    before = metric(http, hits)
    second = complete(client, prompt, 8)
    assert metric(http, hits) > before
    assert second.choices[0].text == first.choices[0].text
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert (second.usage.prompt_tokens_details.cached_tokens or 0) > 0


# --- client disconnect -----------------------------------------------------------------------


def busy_slots(http: httpx.Client) -> int:
    return sum(1 for s in http.get("/slots").json() if s["is_processing"])


def test_disconnect_mid_stream_frees_the_slot(url: str, http: httpx.Client) -> None:
    # 3000 tokens take well over the 5 s allowed below: only an abort frees the slot in time.
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3000, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=30) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            # Keep the iterator referenced: a dropped, half-read one closes the connection.
            lines = r.iter_lines()
            events: list[str] = []
            while len(events) < 2:
                line = next(lines)
                if line:
                    events.append(line)
            assert all(e.startswith("data: {") for e in events), events
            assert busy_slots(http) == 1
        # leaving the block closes the half-read response's connection
    deadline = time.monotonic() + 5
    while busy_slots(http) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_slots(http) == 0
    assert metric(http, "llama_mpi_running_requests") == 0


# --- load --------------------------------------------------------------------------------------


async def _stream_one(ac: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    text, finish, usage, done = [], None, None, False
    async with ac.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            assert not done, "data after [DONE]"
            if data == "[DONE]":
                done = True
                continue
            event = json.loads(data)
            assert "error" not in event, event
            for ch in event["choices"]:
                text.append(ch["text"])
                finish = ch["finish_reason"] or finish
            usage = event.get("usage") or usage
    return {"text": "".join(text), "finish": finish, "usage": usage, "done": done}


def test_load_64_concurrent_streams(url: str, client: OpenAI) -> None:
    bodies = [{"model": "tiny", "prompt": long_prompt(f"u{i}-", 1 + (i * 7) % 40),
               "max_tokens": 8 + (i * 5) % 41, "temperature": 0, "ignore_eos": True,
               "stream": True, "stream_options": {"include_usage": True}} for i in range(64)]

    async def run_all() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as ac:
            return await asyncio.wait_for(
                asyncio.gather(*(_stream_one(ac, b) for b in bodies)), timeout=60)

    results = asyncio.run(run_all())
    for body, res in zip(bodies, results, strict=True):
        assert res["done"] and res["finish"] == "length", res
        assert res["usage"]["completion_tokens"] == body["max_tokens"], res
    for i in range(0, 64, 8):  # a sample, re-run alone and not streamed
        again = complete(client, bodies[i]["prompt"], bodies[i]["max_tokens"])
        assert results[i]["text"] == again.choices[0].text, i


# --- bad input -------------------------------------------------------------------------------


BAD_REQUESTS = {
    "malformed-json": {"content": b'{"prompt": "hi", "max_tokens": 4', "code": "json_invalid"},
    "prompt-over-context": {"json": {"prompt": [65] * 5000, "max_tokens": 4},
                            "code": "context_length_exceeded"},
    "wrong-field-type": {"json": {"prompt": "hi", "max_tokens": "many"}, "code": None},
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_400_and_server_keeps_serving(
    case: str, http: httpx.Client, client: OpenAI
) -> None:
    spec = BAD_REQUESTS[case]
    kwargs = {k: spec[k] for k in ("json", "content") if k in spec}
    r = http.post("/v1/completions", headers={"content-type": "application/json"}, **kwargs)
    assert r.status_code == 400
    err = r.json()["error"]
    assert isinstance(err, dict) and err["code"] == spec["code"] and err["message"]
    assert complete(client, "still alive?", 4).choices[0].text
