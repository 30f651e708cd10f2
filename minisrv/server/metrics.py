"""`/metrics` in Prometheus text format, every value read from the scheduler at scrape time.

Names follow vLLM's (`vllm:num_requests_running` -> `minisrv:num_requests_running`), and every series
carries vLLM's `model_name` label; `--metrics-prefix vllm` gives vLLM's names exactly, so dashboards made for it
read them unchanged. Nothing is counted here: gauges, counters and the request histograms
(minisrv/scheduler/metrics.py) are the scheduler's, as it last published them (EngineHandle.stats() and
.histograms()), so a slow or vanished client changes none of them, and several data-parallel replicas add up.
The HTTP connection counts are the API server's own (minisrv/server/connections.py).
"""
from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from minisrv.server.connections import Connections
from minisrv.wire.terms import HISTOGRAM_OFFSETS, REQUEST_HISTOGRAMS, HistogramValues, SchedulerStats

MODEL_LABEL = ["model_name"]


class _SchedulerCollector:
    def __init__(self, read_stats: Callable[[], SchedulerStats], read_histograms: Callable[[], HistogramValues],
                 model_name: Callable[[], str], prefix: str) -> None:
        self._prefix = prefix
        self._read_stats = read_stats
        self._read_histograms = read_histograms
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
                 s.num_preemptions),
                (CounterMetricFamily, "prompt_tokens", "Prompt tokens of admitted requests.", s.prompt_tokens),
                (CounterMetricFamily, "generation_tokens", "Generated tokens.", s.generation_tokens),
                (CounterMetricFamily, "spec_decode_num_drafts", "Decode steps of a request with drafted tokens.",
                 s.spec_decode_num_drafts),
                (CounterMetricFamily, "spec_decode_num_draft_tokens", "Tokens drafted (--speculative-config).",
                 s.spec_decode_num_draft_tokens),
                (CounterMetricFamily, "spec_decode_num_accepted_tokens", "Drafted tokens the model agreed with.",
                 s.spec_decode_num_accepted_tokens)):
            metric = family(f"{self._prefix}:{name}", doc, labels=MODEL_LABEL)
            metric.add_metric(labels, value)
            yield metric
        finished = CounterMetricFamily(f"{self._prefix}:request_success",
                                       "Finished requests (choices) by finish reason.",
                                       labels=["finished_reason", *MODEL_LABEL])
        for reason, count in (("stop", s.finished_stop), ("length", s.finished_length), ("abort", s.finished_abort)):
            finished.add_metric([reason, *labels], count)
        yield finished
        yield from self._histograms(labels)

    def _histograms(self, labels: list[str]) -> Iterator[Metric]:
        values = self._read_histograms()
        for i, (spec, total) in enumerate(zip(REQUEST_HISTOGRAMS, values.sums)):
            counts = values.counts[HISTOGRAM_OFFSETS[i] : HISTOGRAM_OFFSETS[i + 1]]
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, spec.buckets), "+Inf"], counts):
                cumulative += count
                buckets.append((bound, cumulative))
            metric = HistogramMetricFamily(f"{self._prefix}:{spec.name}", spec.doc, labels=MODEL_LABEL)
            metric.add_metric(labels, buckets, sum_value=total)
            yield metric


class _ConnectionCollector:
    """The API server's own: its open HTTP connections and those refused past --max-connections."""

    def __init__(self, connections: Connections, model_name: Callable[[], str], prefix: str) -> None:
        self._prefix = prefix
        self._connections = connections
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        labels = [self._model_name()]
        for family, name, doc, value in (
                (GaugeMetricFamily, "http_connections", "Open HTTP connections.", self._connections.open),
                (GaugeMetricFamily, "http_connections_limit", "Open HTTP connections allowed (--max-connections).",
                 self._connections.limit),
                (CounterMetricFamily, "http_connections_refused", "Connections answered 503 at the limit.",
                 self._connections.refused)):
            metric = family(f"{self._prefix}:{name}", doc, labels=MODEL_LABEL)
            metric.add_metric(labels, value)
            yield metric


class ServerMetrics:
    """Every metric the API server exports, in a private registry (two apps in one process never clash)."""

    def __init__(self, read_stats: Callable[[], SchedulerStats], read_histograms: Callable[[], HistogramValues],
                 model_name: Callable[[], str], connections: Connections | None, prefix: str) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_SchedulerCollector(read_stats, read_histograms, model_name, prefix))
        if connections is not None:
            self.registry.register(_ConnectionCollector(connections, model_name, prefix))

    def render(self) -> bytes:
        return generate_latest(self.registry)
