"""Hostile JSON at every route: wrong types, huge or non-finite numbers, lone surrogates,
nested junk. Whatever arrives, the answer is never a 5xx, and the server keeps serving."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.mpi_server.fake_engine import FakeEngine, make_app

POST_ROUTES = ["/v1/chat/completions", "/v1/completions", "/completion", "/completions",
               "/tokenize", "/detokenize", "/generate", "/generate_stream"]
GET_ROUTES = ["/health", "/v1/models", "/slots", "/metrics"]

FIELDS = ["model", "messages", "prompt", "max_tokens", "n_predict", "temperature", "top_p",
          "top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty",
          "repeat_penalty", "seed", "stop", "logit_bias", "ignore_eos", "n", "stream",
          "stream_options", "logprobs", "top_logprobs", "max_completion_tokens", "echo",
          "n_probs", "content", "add_special", "parse_special", "with_pieces", "tokens",
          "inputs", "parameters"]
LIGHT_FIELDS = ["max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
                "repetition_penalty", "presence_penalty", "frequency_penalty",
                "stop_sequences", "seed", "ignore_eos"]
VALID = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"prompt": "hi"},
    "/completion": {"prompt": "hi"},
    "/completions": {"prompt": "hi"},
    "/tokenize": {"content": "hi"},
    "/detokenize": {"tokens": [70, 71]},
    "/generate": {"inputs": "hi"},
    "/generate_stream": {"inputs": "hi"},
}

NASTY_TEXT = ["\ud800", "\udfff", "a\udc00b", "\x00", "\u0663", "1_3", " 12 ", "-1", "",
              "<｜end▁of▁sentence｜>", "NaN", "1e999", "\u202e", "𝟙", "\n"]
text = st.one_of(st.text(max_size=12), st.sampled_from(NASTY_TEXT),
                 st.lists(st.sampled_from(NASTY_TEXT + ["a", "7"]), max_size=5).map("".join))
numbers = st.one_of(
    st.integers(),
    st.sampled_from([0, 1, -1, 2, 16, 17, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64,
                     -(2**63) - 1, 10**30, -(10**30), 2**200]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 1e30, 5e-324,
                     -0.0, 0.5, 1.0, 100.0, 101.0]),
)
leaves = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    leaves,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.one_of(text, st.sampled_from(FIELDS)), kids,
                                           max_size=4)),
    max_leaves=10,
)
messages = st.lists(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"role": st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]),
                               json_values)},
            optional={"content": st.one_of(text, json_values,
                                           st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["text", "image_url"]),
                                                "text": st.one_of(text, json_values)}),
                                               max_size=3)),
                      "name": json_values, "tool_calls": json_values}),
    ),
    max_size=4,
)
field_values: dict[str, Any] = {
    "messages": st.one_of(messages, json_values),
    "logit_bias": st.one_of(st.dictionaries(text, numbers, max_size=4), json_values),
    "parameters": st.one_of(
        st.dictionaries(st.sampled_from(LIGHT_FIELDS), json_values, max_size=5), json_values),
    "tokens": st.one_of(st.lists(numbers, max_size=8), json_values),
    "prompt": st.one_of(text, st.lists(numbers, max_size=8), st.lists(text, max_size=3),
                        json_values),
}


@st.composite
def bodies(draw: Any, path: str) -> bytes:
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "value", "raw"]))
    if kind == "raw":
        return draw(st.one_of(st.binary(max_size=40), st.sampled_from(
            [b"", b"{", b'{"messages": [', b"[]" * 3, b"\xff\xfe", b'{"a": 1e99999}'])))
    if kind == "value":
        return json.dumps(draw(json_values)).encode()
    body = dict(VALID.get(path, {}))
    names = draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True))
    for name in names:
        body[name] = draw(field_values.get(name, json_values))
    if draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body) or ["x"])), None)
    return json.dumps(body).encode()  # NaN, Infinity and \udXXX escapes as Python writes them


@st.composite
def requests(draw: Any) -> tuple[str, str, bytes]:
    if draw(st.integers(0, 9)) == 0:
        path = draw(st.sampled_from(GET_ROUTES + POST_ROUTES))
        return draw(st.sampled_from(["GET", "POST", "PUT"])), path, draw(bodies(path))
    path = draw(st.sampled_from(POST_ROUTES))
    return "POST", path, draw(bodies(path))


def test_fuzz_every_route() -> None:
    engine = FakeEngine(max_model_len=64)
    app = make_app(engine, max_request_bytes=64 << 10)
    statuses: dict[int, int] = {}
    with TestClient(app, raise_server_exceptions=False) as client:

        @settings(max_examples=400, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=requests())
        def one(case: tuple[str, str, bytes]) -> None:
            method, path, content = case
            r = client.request(method, path, content=content,
                               headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (method, path, content, r.text[:500])
            if r.status_code >= 400:
                assert "error" in r.json(), r.text[:500]
            else:  # a stream may only report a failure in-band: none is expected here
                assert "server_error" not in r.text, (path, content, r.text[:500])

        one()
        r = client.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = client.post("/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Hel"
    assert not engine.running
    assert statuses.get(200, 0) > 10 and statuses.get(400, 0) > 100, statuses


NASTY_BODIES = [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser recurses
    b'{"messages": ' + b"[" * 900 + b"]" * 900 + b"}",
    b'{"messages": [{"role": "user", "content": "x", "tool_calls": '
    + b'{"a": ' * 900 + b"1" + b"}" * 900 + b"}]}",
    b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}",  # over Python's int digit limit
    b'{"prompt": "a", "temperature": 1e999}',
    b'{"prompt": "a", "seed": -1e999}',
    b'{"prompt": "a", "logit_bias": {"5": NaN}}',
    b'{"prompt": "a", "stop": ["\\ud83d"]}',
    b'{"prompt": "\\ud83d\\ude00 ok"}',  # a proper pair is fine
    b'{"prompt": "a", "n": 16, "stream": true, "seed": 18446744073709551615}',
]


def test_nasty_bodies() -> None:
    engine = FakeEngine(max_model_len=64)
    client = TestClient(make_app(engine), raise_server_exceptions=False)
    for path in ("/v1/chat/completions", "/v1/completions", "/completion", "/generate"):
        for body in NASTY_BODIES:
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert r.status_code < 500, (path, body[:80], r.text[:300])
            assert "server_error" not in r.text, (path, body[:80], r.text[:300])
    assert client.get("/health").status_code == 200
