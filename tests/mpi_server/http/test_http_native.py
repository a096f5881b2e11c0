"""llama.cpp and LightLLM endpoints, /health, /slots and /metrics."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.mpi_server.fake_engine import BOS, EOS, OFFSET, FakeEngine, make_app


def sse_json(text: str) -> list[dict]:
    return [json.loads(b[len("data: "):]) for b in text.split("\n\n") if b.strip()]


def test_health(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_llamacpp_completion(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/completion", json={"prompt": "abc", "n_predict": 5, "temperature": 0,
                                          "repeat_penalty": 1.2, "top_k": 10})
    body = r.json()
    assert body["content"] == "Hello" and body["stop"] is True
    assert body["tokens_predicted"] == 5 and body["tokens_evaluated"] == 4
    assert body["stop_type"] == "limit"
    t = body["timings"]
    for k in ("prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
              "predicted_per_second"):
        assert k in t
    assert t["predicted_n"] == 5
    p = engine.calls[0][2]
    assert (p.temperature, p.repetition_penalty, p.top_k) == (0.0, 1.2, 10)


def test_llamacpp_unlimited_and_no_perf(engine: FakeEngine) -> None:
    client = TestClient(make_app(engine, no_perf=True))
    body = client.post("/completion", json={"prompt": "abc", "n_predict": -1}).json()
    assert body["content"] == "Hello from fake" and body["stop_type"] == "eos"
    assert "timings" not in body
    assert engine.calls[0][2].max_tokens == engine.max_model_len - 4


def test_llamacpp_completion_stream(client: TestClient) -> None:
    r = client.post("/completion", json={"prompt": "abc", "n_predict": 3, "stream": True})
    ev = sse_json(r.text)
    assert [e["stop"] for e in ev] == [False, False, True]
    assert "".join(e["content"] for e in ev) == "Hel"
    assert ev[-1]["tokens_predicted"] == 3 and "timings" in ev[-1]
    assert "[DONE]" not in r.text


def test_tokenize_detokenize(client: TestClient) -> None:
    assert client.post("/tokenize", json={"content": "AB"}).json() == {
        "tokens": [65 + OFFSET, 66 + OFFSET]}
    r = client.post("/tokenize", json={"content": "A", "add_special": True, "with_pieces": True})
    assert r.json() == {"tokens": [{"id": BOS, "piece": "<s>"}, {"id": 65 + OFFSET, "piece": "A"}]}
    r = client.post("/detokenize", json={"tokens": [65 + OFFSET, 66 + OFFSET]})
    assert r.json() == {"content": "AB"}
    assert client.post("/detokenize", json={"tokens": [10**6]}).status_code == 400
    assert client.post("/tokenize", json={}).status_code == 400


def test_slots(client: TestClient) -> None:
    slots = client.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1]
    assert slots[1]["is_processing"] and slots[1]["n_decoded"] == 3


def test_lightllm_generate(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/generate", json={"inputs": "abc", "parameters": {
        "max_new_tokens": 4, "do_sample": True, "temperature": 0.7, "top_k": 5, "seed": 3,
        "stop_sequences": ["zz"], "repetition_penalty": 1.05}})
    body = r.json()
    assert body == {"generated_text": ["Hell"], "count_output_tokens": 4,
                    "finish_reason": "length"}
    p = engine.calls[0][2]
    assert (p.temperature, p.top_k, p.seed, p.stop, p.repetition_penalty) == (
        0.7, 5, 3, ["zz"], 1.05)
    client.post("/generate", json={"inputs": "abc"})
    assert engine.calls[1][2].temperature == 0.0  # do_sample defaults to False: greedy


def test_lightllm_generate_stream(client: TestClient) -> None:
    r = client.post("/generate_stream", json={"inputs": "abc",
                                               "parameters": {"max_new_tokens": 40}})
    ev = sse_json(r.text)
    assert all(set(e) >= {"token", "generated_text", "finished", "finish_reason"} for e in ev)
    assert set(ev[0]["token"]) == {"id", "text", "logprob", "special"}
    assert [e["finished"] for e in ev] == [False] * (len(ev) - 1) + [True]
    assert all(e["generated_text"] is None for e in ev[:-1])
    assert ev[-1]["generated_text"] == "Hello from fake"
    assert ev[-1]["token"]["id"] == EOS and ev[-1]["token"]["special"] is True
    assert ev[-1]["finish_reason"] == "stop"
    assert ev[0]["token"]["logprob"] == -0.25


def test_metrics(client: TestClient) -> None:
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 3})
    client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 0})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}

    def value(name: str, **labels: str) -> float:
        for s in fams[name].samples:
            if s.name.endswith(("_total", "_count")) or s.name == name:
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        raise KeyError(name)

    assert value("llama_mpi_requests", endpoint="/v1/completions", status="200") == 1
    assert value("llama_mpi_requests", endpoint="/v1/completions", status="400") == 1
    assert value("llama_mpi_prompt_tokens") == 4
    assert value("llama_mpi_generation_tokens") == 3
    assert value("llama_mpi_queue_length") == 3
    assert value("llama_mpi_kv_cache_usage_ratio") == 0.25
    assert value("llama_mpi_running_requests") == 0
    assert value("llama_mpi_prefix_cache_hit_tokens") == 7
    assert value("llama_mpi_prefix_cache_query_tokens") == 10
    assert fams["llama_mpi_time_to_first_token_seconds"].type == "histogram"
    assert value("llama_mpi_time_to_first_token_seconds") == 1
    assert value("llama_mpi_time_per_output_token_seconds") == 1


def test_metrics_registry_per_app() -> None:
    a, b = TestClient(make_app()), TestClient(make_app())
    a.post("/v1/completions", json={"prompt": "a", "max_tokens": 1})
    assert 'endpoint="/v1/completions"' not in b.get("/metrics").text
