"""`/metrics` in Prometheus text format: API-side request timings and token counts, scheduler gauges.

Names follow vLLM's (`vllm:num_requests_running` -> `minisrv:num_requests_running`), and every series
carries vLLM's `model_name` label, so existing dashboards need only the prefix changed. Scheduler-side values are not pushed here: each scrape reads
the scheduler's stats, as it last published them (EngineHandle.stats()).
"""
from __future__ import annotations

import time
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from minisrv.server.engine_handle import OutputDelta
from minisrv.wire.terms import SchedulerStats

# Bucket edges in seconds, as vLLM's, so latency panels line up between the two servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
MODEL_LABEL = ["model_name"]
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _SchedulerCollector:
    """Reads the scheduler's stats at scrape time, so the values are as fresh as its last step."""

    def __init__(self, read_stats: Callable[[], SchedulerStats], model_name: Callable[[], str]) -> None:
        self._read_stats = read_stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        s, labels = self._read_stats(), [self._model_name()]
        for family, name, doc, value in (
                (GaugeMetricFamily, "num_requests_running", "Requests in the running batch.", s.num_running),
                (GaugeMetricFamily, "num_requests_waiting", "Requests queued for admission.", s.num_waiting),
                (GaugeMetricFamily, "kv_cache_usage_perc", "Fraction of KV cache pages held by requests (0..1).",
                 s.kv_cache_usage),
                (CounterMetricFamily, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                 s.prefix_cache_queries),
                (CounterMetricFamily, "prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                 s.prefix_cache_hits),
                (CounterMetricFamily, "num_preemptions", "Running requests preempted to wait for KV pages.",
                 s.num_preemptions)):
            metric = family(f"minisrv:{name}", doc, labels=MODEL_LABEL)
            metric.add_metric(labels, value)
            yield metric


class ServerMetrics:
    """Every metric the API server exports, in a private registry (two apps in one process never clash)."""

    def __init__(self, read_stats: Callable[[], SchedulerStats], model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name   # known once the engine is ready, so read at each observation
        r, label = self.registry, MODEL_LABEL
        self.prompt_tokens = Counter("minisrv:prompt_tokens", "Prompt tokens of served requests.", label, registry=r)
        self.generation_tokens = Counter("minisrv:generation_tokens", "Generated tokens.", label, registry=r)
        self.request_success = Counter("minisrv:request_success", "Finished requests (choices) by finish reason.",
                                       ["finished_reason", *label], registry=r)
        self.time_to_first_token = Histogram("minisrv:time_to_first_token_seconds",
                                             "Request arrival to its first generated token.", label,
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("minisrv:inter_token_latency_seconds",
                                             "Time between consecutive tokens of a choice.", label,
                                             buckets=ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("minisrv:e2e_request_latency_seconds",
                                             "Request arrival to its last choice finishing.", label,
                                             buckets=E2E_BUCKETS, registry=r)
        r.register(_SchedulerCollector(read_stats, model_name))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """One request's timings and counts, fed every delta of every choice as the response consumes it."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics
        self._model = metrics.model_name()
        self._arrival = time.perf_counter()
        self._first_token_seen = False
        self._last_token_at: dict[int, float] = {}   # choice index -> when its latest tokens arrived
        self._prompts_counted: set[int] = set()

    def on_delta(self, choice: int, prompt: int, delta: OutputDelta) -> None:
        m = self._metrics
        if prompt not in self._prompts_counted:
            self._prompts_counted.add(prompt)
            m.prompt_tokens.labels(self._model).inc(delta.num_prompt_tokens)
        if delta.token_ids:
            now = time.perf_counter()
            if not self._first_token_seen:
                self._first_token_seen = True
                m.time_to_first_token.labels(self._model).observe(now - self._arrival)
            last = self._last_token_at.get(choice)
            if last is not None:
                # A delta may carry several tokens when the detokenizer batches steps; spread the gap.
                gap = (now - last) / len(delta.token_ids)
                itl = m.inter_token_latency.labels(self._model)
                for _ in delta.token_ids:
                    itl.observe(gap)
            self._last_token_at[choice] = now
            m.generation_tokens.labels(self._model).inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            m.request_success.labels(delta.finish_reason, self._model).inc()

    def on_finish(self) -> None:
        self._metrics.e2e_request_latency.labels(self._model).observe(time.perf_counter() - self._arrival)
