"""The scheduler process loop over real rings, with a model-free engine, in one process (a thread)."""
from __future__ import annotations

import math
import os
import random
import threading
import time

import pytest

from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.runtime.channels import RingChannel
from minisrv.runtime.scheduler_process import SchedulerChannels, SchedulerLoop, step_tokens
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import ParentWatch, WorkerInfo
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.metrics import RequestMetrics
from minisrv.scheduler.request import RequestOutput, SampleResult
from minisrv.wire.records import Abort, Error, Kind, Shutdown, StepTokens, TokenizedRequest, peek_kind
from minisrv.wire.terms import FinishReason, SchedulerStats

VOCAB = 100


class FakeEngine:
    """LLMEngine's interface; the next token is a function of the context, one token per step."""

    def __init__(self) -> None:
        self.requests: dict[int, tuple[list[int], SamplingParams, list[int]]] = {}
        self.arrivals: dict[int, float | None] = {}
        self._metrics = RequestMetrics()

    def add_request(self, rid: int, prompt_ids: list[int], params: SamplingParams, grammar=None,
                    arrival: float | None = None, priority: int = 0) -> None:
        self.arrivals[rid] = arrival
        if not prompt_ids:
            raise ValueError(f"request {rid}: the prompt is empty; it needs at least one token")
        self.requests[rid] = (prompt_ids, params, [])

    def abort(self, rid: int) -> RequestOutput | None:
        if rid not in self.requests:
            return None
        prompt, _, out = self.requests.pop(rid)
        return RequestOutput(rid, [], [], FinishReason.ABORT, len(prompt), 0, len(out))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for rid, (prompt, params, out) in list(self.requests.items()):
            token = sum(prompt + out) % VOCAB
            out.append(token)
            finish = FinishReason.LENGTH if len(out) == params.max_tokens else FinishReason.NONE
            sample = SampleResult(token, -0.5, [token, 3], [-0.5, -2.0]) if params.logprobs is not None else \
                SampleResult(token)
            outputs.append(RequestOutput(rid, [token], [sample], finish, len(prompt), 0, len(out)))
            if finish:
                del self.requests[rid]
        return outputs

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.requests), 0, len(self.requests) / 10, 5, 2)

    def metrics(self) -> RequestMetrics:
        return self._metrics


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(sum(prompt + out) % VOCAB)
    return out


@pytest.fixture
def scheduler():
    """(tokenizer's writer, detokenizer's stop-writer, STEP_TOKENS reader, status block)."""
    with RingSet() as rings:
        gen = rings.create("tok0", 1 << 16, wakeup=Wakeup.FIFO)
        stops = rings.create("stops", 1 << 12, wakeup=Wakeup.FIFO)
        tokens = rings.create("tokens", 1 << 16, wakeup=Wakeup.FIFO)
        status = StatusBlock.create(f"{rings.prefix}-status", num_workers=1)
        info = WorkerInfo("scheduler", 0, os.getppid(), status.spec, "info")
        channels = SchedulerChannels((RingChannel(gen.reader),), RingChannel(stops.reader), RingChannel(tokens.producer))
        process = SchedulerLoop(channels, ParentWatch(info))
        process.engine, process.status = FakeEngine(), status
        ends = RingWriter(gen.producer), RingWriter(stops.producer), RingReader(tokens.reader)
        thread = threading.Thread(target=process.run)
        thread.start()
        yield (*ends, status)
        ends[0].write(Shutdown().encode())
        thread.join(10)
        assert not thread.is_alive()
        for end in (*ends, process):
            end.close()
        status.unlink()
        status.close()


def collect_until_finished(reader: RingReader, rids: set[int]) -> list[tuple[int, int, int, int]]:
    """(rid, token, finish, output count) rows until every rid has finished."""
    rows, open_rids = [], set(rids)
    while open_rids:
        record = reader.read(timeout=10)
        if peek_kind(record) is Kind.ERROR:
            open_rids.discard(Error.decode(record).rid)
            continue
        step = StepTokens.decode(record)
        for row in zip(step.rids.tolist(), step.token_ids.tolist(), step.finish_reasons.tolist(),
                       step.num_output_tokens.tolist()):
            rows.append(row)
            if row[2]:
                open_rids.discard(row[0])
    return rows


def test_requests_stream_one_row_per_step_until_they_finish(scheduler) -> None:
    to_scheduler, _, tokens, status = scheduler
    rng = random.Random(8)
    prompts = {rid: [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))] for rid in (16, 17, 33)}
    lengths = {16: 3, 17: 6, 33: 1}
    to_scheduler.write_many(TokenizedRequest(rid, SamplingParams(max_tokens=lengths[rid]), p).encode()
                            for rid, p in prompts.items())
    rows = collect_until_finished(tokens, set(prompts))
    for rid, prompt in prompts.items():
        mine = [r for r in rows if r[0] == rid]
        assert [t for _, t, _, _ in mine] == expected_tokens(prompt, lengths[rid])
        assert [c for _, _, _, c in mine] == list(range(1, lengths[rid] + 1))
        assert [f for _, _, f, _ in mine] == [0] * (lengths[rid] - 1) + [FinishReason.LENGTH]
    assert status.stats().num_running == 0   # published before the last STEP_TOKENS record
    assert status.stats().prefix_cache_queries == 5


def test_step_tokens_carry_the_time_they_were_sent(scheduler) -> None:
    to_scheduler, _, tokens, _ = scheduler
    before = time.monotonic_ns()
    to_scheduler.write(TokenizedRequest(80, SamplingParams(max_tokens=3), [4, 5]).encode())
    stamps = [StepTokens.decode(tokens.read(timeout=10)).emitted_ns for _ in range(3)]
    assert before < stamps[0] < stamps[1] < stamps[2] <= time.monotonic_ns()


def test_refused_requests_come_back_as_errors_without_internal_ids(scheduler) -> None:
    to_scheduler, _, tokens, _ = scheduler
    to_scheduler.write(TokenizedRequest(48, SamplingParams(), []).encode())
    error = Error.decode(tokens.read(timeout=10))
    assert (error.rid, error.status) == (48, 400)
    assert error.message == "the prompt is empty; it needs at least one token"


def test_aborts_from_tokenizers_and_detokenizer_finish_requests(scheduler) -> None:
    to_scheduler, stops, tokens, _ = scheduler
    to_scheduler.write_many([TokenizedRequest(64, SamplingParams(max_tokens=10**6), [5]).encode(),
                             TokenizedRequest(65, SamplingParams(max_tokens=10**6), [6]).encode()])
    first = StepTokens.decode(tokens.read(timeout=10))
    assert sorted(first.rids.tolist()) == [64, 65]
    to_scheduler.write(Abort(64).encode())
    stops.write(Abort(65).encode())
    rows = collect_until_finished(tokens, {64, 65})
    finishes = {rid: (t, f) for rid, t, f, _ in rows if f}
    assert finishes == {64: (-1, FinishReason.ABORT), 65: (-1, FinishReason.ABORT)}


def test_step_tokens_rows_and_logprobs() -> None:
    outputs = [
        RequestOutput(1, [7, 8], [SampleResult(7, -0.1, [7, 2], [-0.1, -3.0]), SampleResult(8, -0.2, [8], [-0.2])],
                      FinishReason.STOP, 4, 2, 5),
        RequestOutput(2, [9], [SampleResult(9)], FinishReason.NONE, 3, 0, 1),
        RequestOutput(3, [], [], FinishReason.ABORT, 6, 0, 2),
    ]
    step = StepTokens.decode(step_tokens(outputs).encode())
    assert step.rids.tolist() == [1, 1, 2, 3]
    assert step.token_ids.tolist() == [7, 8, 9, -1]
    assert step.finish_reasons.tolist() == [0, FinishReason.STOP, 0, FinishReason.ABORT]
    assert step.num_output_tokens.tolist() == [4, 5, 1, 2]
    lps = step.logprobs.tolist()
    assert lps[:2] == pytest.approx([-0.1, -0.2]) and math.isnan(lps[2]) and math.isnan(lps[3])
    assert step.top_counts.tolist() == [2, 1, 0, 0]
    assert step.top_ids.tolist() == [7, 2, 8]


def test_prompt_logprob_rows_come_before_the_output_rows() -> None:
    prompt = [SampleResult(11, -1.0, [4], [-0.5], rank=3), SampleResult(12, -2.0, [12], [-2.0], rank=1)]
    outputs = [
        RequestOutput(1, [], [], FinishReason.NONE, 3, 0, 0, prompt_samples=prompt[:1]),   # a prefill chunk
        RequestOutput(2, [7], [SampleResult(7)], FinishReason.NONE, 3, 0, 1, prompt_samples=prompt),
    ]
    step = StepTokens.decode(step_tokens(outputs).encode())
    assert step.rids.tolist() == [1, 2, 2, 2]   # a chunk's prompt rows need no bare row after them
    assert step.token_ids.tolist() == [11, 11, 12, 7]
    assert step.in_prompt.tolist() == [1, 1, 1, 0]
    assert step.ranks.tolist() == [3, 3, 1, 0]
    assert step.top_ids.tolist() == [4, 4, 12]
    assert step.finish_reasons.tolist() == [0, 0, 0, 0]
