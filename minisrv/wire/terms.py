"""Terms every process shares: finish reasons, the request-id scheme, the scheduler's published stats, and how a
chat template's extra arguments travel.

Request ids: the API server numbers requests (the base id); the tokenizer worker turns a request with n
choices into n TOKENIZED_REQUEST records whose ids carry the choice index in their low bits, so the
scheduler sees independent requests (sharing prompt pages through the prefix cache) and every row
coming back tells the API server which request and which choice it belongs to without a lookup table.
With several API server processes (--api-server-count) each numbers its requests in its own residue class,
so a row's id also tells the detokenizer which of them it goes to.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from itertools import accumulate, count


class FinishReason(enum.IntEnum):
    """Codes travel in STEP_TOKENS and TEXT_DELTAS records; names are what the OpenAI API reports."""

    NONE = 0
    STOP = 1     # EOS, a stop token id, or a stop string
    LENGTH = 2   # max_tokens or the context length
    ABORT = 3    # client went away, server shutting down

    @property
    def api_name(self) -> str | None:
        return None if self is FinishReason.NONE else self.name.lower()


# api_name by code, for hot loops over record columns (an enum lookup per row costs more than the row).
FINISH_API_NAMES: tuple[str | None, ...] = tuple(reason.api_name for reason in FinishReason)


CHOICE_BITS = 4
MAX_CHOICES = 1 << CHOICE_BITS   # n is in [1, MAX_CHOICES]


def choice_rid(base: int, index: int) -> int:
    """The engine request id of choice `index` of request `base`."""
    return base << CHOICE_BITS | index


def split_rid(rid: int) -> tuple[int, int]:
    """(base id, choice index) of an engine request id."""
    return rid >> CHOICE_BITS, rid & (MAX_CHOICES - 1)


def api_base_ids(api_server: int, api_server_count: int) -> count:
    """The base ids API server process `api_server` gives its requests: disjoint from every other's, and
    telling whose a request is (api_server_of) to the detokenizer, which sends each its own rows."""
    return count(api_server_count + api_server, api_server_count)


def api_server_of(rid: int, api_server_count: int) -> int:
    """The API server process that an engine request id (of any choice) came from."""
    return split_rid(rid)[0] % api_server_count


_GOLDEN = 0x9E3779B97F4A7C15   # 2**64 / golden ratio: spreads consecutive indices over all bits


def choice_seed(seed: int | None, index: int) -> int | None:
    """The seed of choice `index` of a seeded request: a seed fixes all n choices, yet they are different
    samples (as in vLLM). Choice 0 keeps the request's seed, so n does not change the first choice."""
    if seed is None or index == 0:
        return seed
    return (seed ^ (index * _GOLDEN)) & ((1 << 63) - 1)


@dataclass
class SchedulerStats:
    """The scheduler's gauges and counters, published after every step (the status block carries them to
    /metrics). Fields are ints or floats; the status block's layout follows this declaration."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0      # 0..1: pages held by requests / all pages (idle cached pages count as free)
    prefix_cache_queries: int = 0    # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0       # of those, tokens found (cumulative)
    num_preemptions: int = 0         # running requests sent back to wait for pages (cumulative)
    prompt_tokens: int = 0           # prompt tokens of admitted requests (cumulative)
    generation_tokens: int = 0       # tokens sampled (cumulative)
    finished_stop: int = 0           # requests finished, by reason (cumulative)
    finished_length: int = 0
    finished_abort: int = 0
    prefix_cache_flushes: int = 0    # FLUSH_CACHE records applied (cumulative): /flush_cache waits on it
    spec_decode_num_drafts: int = 0          # decode steps of a request with drafts (cumulative)
    spec_decode_num_draft_tokens: int = 0    # tokens drafted (cumulative)
    spec_decode_num_accepted_tokens: int = 0  # of those, tokens the model agreed with (cumulative)


@dataclass(frozen=True)
class HistogramSpec:
    name: str                        # the Prometheus name, after the "minisrv:" prefix
    doc: str
    buckets: tuple[float, ...]       # upper bounds; a last +Inf bucket is implied


# vLLM's bucket edges, so dashboards line up between the two servers.
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
         80.0, 160.0, 640.0, 2560.0)
_ITL = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
              480.0, 960.0, 1920.0, 7680.0)
_TOKENS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
_ITERATION = (1, 8, 16, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120, 128, 256, 512, 1024, 2048, 4096, 8192)

# Observed by the scheduler (minisrv/scheduler/metrics.py) from the API server's arrival time of each request,
# so a slow or vanished client changes none of them; the status block carries them to /metrics.
REQUEST_HISTOGRAMS = (
    HistogramSpec("time_to_first_token_seconds", "Request arrival to its first sampled token.", _TTFT),
    HistogramSpec("inter_token_latency_seconds", "Time between consecutive sampled tokens of a request.", _ITL),
    HistogramSpec("e2e_request_latency_seconds", "Request arrival to its finish.", _REQUEST_S),
    HistogramSpec("request_queue_time_seconds", "Reaching the scheduler to being first scheduled.", _REQUEST_S),
    HistogramSpec("request_prefill_time_seconds", "First scheduled to its first sampled token.", _REQUEST_S),
    HistogramSpec("request_decode_time_seconds", "First sampled token to the finish.", _REQUEST_S),
    HistogramSpec("request_prompt_tokens", "Prompt tokens per finished request.", _TOKENS),
    HistogramSpec("request_generation_tokens", "Generated tokens per finished request.", _TOKENS),
    HistogramSpec("iteration_tokens_total", "Tokens computed per engine step.", _ITERATION),
)
HISTOGRAM_INDEX = {h.name: i for i, h in enumerate(REQUEST_HISTOGRAMS)}
# Where each histogram's bucket counts start in HistogramValues.counts (one slot per bucket, +Inf last), and its length.
HISTOGRAM_OFFSETS = [0, *accumulate(len(h.buckets) + 1 for h in REQUEST_HISTOGRAMS)]
NUM_HISTOGRAM_COUNTS = HISTOGRAM_OFFSETS[-1]


@dataclass(frozen=True)
class HistogramValues:
    """Every REQUEST_HISTOGRAMS' bucket counts (not cumulative; one flat list, each histogram's buckets in turn,
    +Inf last) and their sums, as the status block carries them."""

    counts: list[int]
    sums: list[float]


# chat_template_kwargs values travel as strings tagged with their type (a record carries strings, not JSON):
# the tag, a colon, then the value. Only scalars: what chat templates take as switches (enable_thinking...).
_TEMPLATE_TAGS = {bool: "b", int: "i", float: "f", str: "s"}
_TEMPLATE_PARSERS = {"b": lambda v: v == "1", "i": int, "f": float, "s": str}
TemplateValue = bool | int | float | str


def pack_template_value(value: TemplateValue) -> str:
    tag = _TEMPLATE_TAGS[type(value)]   # type(), not isinstance: a bool is not an int here
    text = str(int(value)) if tag == "b" else repr(value) if tag == "f" else str(value)
    return f"{tag}:{text}"


def unpack_template_value(packed: str) -> TemplateValue:
    tag, _, value = packed.partition(":")
    if tag not in _TEMPLATE_PARSERS:
        raise ValueError(f"not a packed chat template value: {packed!r}")
    return _TEMPLATE_PARSERS[tag](value)
