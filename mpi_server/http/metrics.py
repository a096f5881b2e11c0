"""Prometheus metrics: request/token counters and latency histograms kept here, engine
gauges read from ``engine.stats()`` at scrape time. Each app has its own registry."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llama_mpi.mpi_server.engine.engine_api import AsyncEngineAPI
from llama_mpi.mpi_server.engine.outputs import RequestOutput

log = logging.getLogger(__name__)

PREFIX = "llama_mpi"
_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.engine: AsyncEngineAPI | None = None

    def collect(self) -> Iterator[Metric]:
        if self.engine is None:
            return
        try:
            st = self.engine.stats()
        except Exception:  # noqa: BLE001 - a dead engine must not break the scrape
            log.warning("engine.stats() failed during scrape", exc_info=True)
            return
        yield GaugeMetricFamily(f"{PREFIX}_queue_length", "Requests waiting for a slot",
                                value=st.queue_length)
        yield GaugeMetricFamily(f"{PREFIX}_running_requests", "Requests holding a slot",
                                value=st.running)
        usage = st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0
        yield GaugeMetricFamily(f"{PREFIX}_kv_cache_usage_ratio",
                                "Fraction of KV-cache blocks in use", value=usage)
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hit_tokens",
                                  "Prompt tokens served from the prefix cache",
                                  value=st.prefix_cache_hits)
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_query_tokens",
                                  "Prompt tokens looked up in the prefix cache",
                                  value=st.prefix_cache_queries)
        yield CounterMetricFamily(f"{PREFIX}_constrained_tokens",
                                  "Tokens sampled under a grammar (structured outputs)",
                                  value=st.constrained_tokens)
        yield CounterMetricFamily(f"{PREFIX}_constrained_step_seconds",
                                  "Wall time of the engine steps that sampled a constrained row",
                                  value=st.constrained_step_seconds)
        yield CounterMetricFamily(f"{PREFIX}_grammar_seconds",
                                  "Time of grammar masks and token accepts in those steps",
                                  value=st.grammar_seconds)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed",
                                     registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Tokens generated",
                                         registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds",
                              "Time from submission to the first generated token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Mean time per generated token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self._engine = _EngineCollector()
        r.register(self._engine)

    def bind_engine(self, engine: AsyncEngineAPI) -> None:
        self._engine.engine = engine

    def observe_finished(
        self, out: RequestOutput, ttft: float | None, decode: float | None, *, timed: bool
    ) -> None:
        """Record one finished sub-request; ``ttft``/``decode`` are seconds (None = unknown)."""
        self.prompt_tokens.inc(max(out.prompt_tokens, 0))
        self.generation_tokens.inc(max(out.completion_tokens, 0))
        if not timed:
            return
        if ttft is not None and out.completion_tokens > 0:
            self.ttft.observe(ttft)
        if decode is not None and out.completion_tokens > 1:
            self.tpot.observe(decode / (out.completion_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestCounterMiddleware:
    """Counts every HTTP request by route path (unknown paths fold into "other") and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths  # label values stay bounded: scanners' random paths are "other"

    def _endpoint(self, scope: Scope) -> str:
        path = scope.get("path", "")
        return path if path in self.paths else "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def counting_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(self._endpoint(scope), str(status)).inc()
