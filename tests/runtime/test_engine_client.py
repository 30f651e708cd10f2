"""EngineClient over real rings on uvloop; the test plays the tokenizer worker and the detokenizer."""
from __future__ import annotations

import asyncio
import math
import random

import pytest
import uvloop

from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.runtime.channels import RingChannel
from minisrv.runtime.engine_client import EngineClient
from minisrv.runtime.status_block import ModelFacts, StatusBlock
from minisrv.sampling_params import SamplingParams
from minisrv.server.engine_handle import RequestError
from minisrv.wire.records import Abort, Error, PromptRequest, TextDeltas
from minisrv.wire.terms import FinishReason, SchedulerStats, choice_rid


class Harness:
    def __init__(self, rings: RingSet, num_tokenizers: int = 2) -> None:
        requests = [rings.create(f"req{i}", 1 << 16) for i in range(num_tokenizers)]
        text = rings.create("text", 1 << 16, wakeup=Wakeup.FIFO)
        self.status = StatusBlock.create(f"{rings.prefix}-status", num_workers=1)
        self.api_ends = [RingChannel(r.producer).open() for r in requests]
        self.text_reader = RingChannel(text.reader).open_async()
        self.client = EngineClient(self.api_ends, self.text_reader, self.status, "served-name")
        self.tokenizers = [RingReader(r.reader) for r in requests]
        self.detokenizer = RingWriter(text.producer)
        self.failures: list[str] = []

    def start(self) -> None:
        self.client.start(self.failures.append)
        self.client.mark_ready(ModelFacts("model", 128, 1000))

    def requests(self) -> list[tuple[int, bytes]]:
        """(tokenizer index, record) of everything the client sent so far."""
        return [(i, r) for i, ring in enumerate(self.tokenizers) for r in ring.drain()]

    def send_rows(self, rows: list[tuple[int, str, int, list[int]]], logprobs: bool = False) -> None:
        """rows: (rid, text, finish, token ids); with logprobs, each token gets -0.5 and one alternative."""
        ids = [t for _, _, _, tokens in rows for t in tokens]
        self.detokenizer.write(TextDeltas(
            rids=[r for r, _, _, _ in rows], finish_reasons=[f for _, _, f, _ in rows],
            num_prompt_tokens=[5] * len(rows), num_cached_tokens=[1] * len(rows),
            num_output_tokens=[len(t) for _, _, _, t in rows], texts=[t for _, t, _, _ in rows],
            num_tokens=[len(t) for _, _, _, t in rows], token_ids=ids,
            token_logprobs=[-0.5 if logprobs else math.nan] * len(ids),
            token_bytes=[b"\xe4\xbd" if logprobs else b"" for _ in ids], top_counts=[1 if logprobs else 0] * len(ids),
            top_ids=[3] * len(ids) if logprobs else [], top_logprobs=[-2.0] * len(ids) if logprobs else [],
            top_bytes=[b"x" for _ in ids] if logprobs else [], emitted_ns=[1000 + r for r, _, _, _ in rows],
            token_in_prompt=[False] * len(ids), token_ranks=[0] * len(ids)).encode())

    def close(self) -> None:
        for ring in (*self.tokenizers, self.detokenizer, *self.api_ends, self.text_reader):
            ring.close()
        self.status.unlink()
        self.status.close()


def run(test) -> None:
    async def main() -> None:
        with RingSet() as rings:
            harness = Harness(rings)
            try:
                await test(harness)
            finally:
                await harness.client.close()
                harness.close()
    uvloop.run(main())


def params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=4, **kw)


def test_n_choices_fan_in_until_each_finishes() -> None:
    async def test(h: Harness) -> None:
        h.start()
        gen = h.client.stream(PromptRequest(text="héllo", params=params(), n=2, stop=["\n"]))
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        [(ring, record)] = h.requests()
        req = PromptRequest.decode(record)
        assert (req.text, req.n, req.stop, req.params) == ("héllo", 2, ["\n"], params())
        a, b = choice_rid(req.rid, 0), choice_rid(req.rid, 1)
        h.send_rows([(a, "Hi", 0, [11]), (b, "Yo", 0, [12])])
        h.send_rows([(b, "!", FinishReason.LENGTH, [13]), (a, " there", FinishReason.STOP, [14, 15])])
        deltas = [await first] + [d async for d in gen]
        by_choice = {i: [d for d in deltas if d.index == i] for i in (0, 1)}
        assert "".join(d.text for d in by_choice[0]) == "Hi there"
        # Choice 1's two deltas queued up back to back before the consumer came for them: they go out as one.
        assert [(d.text, d.token_ids, d.finish_reason) for d in by_choice[1]] == [("Yo!", [12, 13], "length")]
        assert by_choice[0][-1].token_ids == [14, 15] and by_choice[0][-1].num_output_tokens == 2
        assert all(d.logprobs is None and d.num_prompt_tokens == 5 and d.num_cached_tokens == 1 for d in deltas)
        assert [d.emitted_ns for d in by_choice[0]] == [1000 + a] * 2   # the detokenizer's per-row stamps
        assert h.requests() == []   # everything finished: no aborts
    run(test)


def test_deltas_that_queue_up_are_merged_per_choice_in_order() -> None:
    async def test(h: Harness) -> None:
        h.start()
        gen = h.client.stream(PromptRequest(text="x", params=params(logprobs=1), n=2))
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        [(_, record)] = h.requests()
        a, b = choice_rid(PromptRequest.decode(record).rid, 0), choice_rid(PromptRequest.decode(record).rid, 1)
        h.send_rows([(a, "1", 0, [1])], logprobs=True)
        assert (await first).text == "1"
        # Nobody reads while these arrive: a's three rows merge, b's row stays apart, then a's finish.
        for row in [(a, "2", 0, [2]), (a, "3", 0, [3, 4]), (b, "B", 0, [9]), (a, "5", FinishReason.LENGTH, [5]),
                    (b, "", FinishReason.STOP, [])]:
            h.send_rows([row], logprobs=True)
        await asyncio.sleep(0.05)
        rest = [d async for d in gen]
        assert [(d.index, d.text, d.token_ids, d.finish_reason) for d in rest] == [
            (0, "23", [2, 3, 4], None), (1, "B", [9], None), (0, "5", [5], "length"), (1, "", [], "stop")]
        assert [len(d.logprobs) for d in rest] == [3, 1, 1, 0]
        assert rest[0].emitted_ns == 1000 + a and rest[0].num_output_tokens == 2   # the first's stamp, the last's counts
    run(test)


def test_requests_alternate_between_tokenizers_and_ids_are_unique() -> None:
    async def test(h: Harness) -> None:
        h.start()
        gens = [h.client.stream(PromptRequest(prompt_ids=[1, 2, 3], params=params())) for _ in range(4)]
        tasks = [asyncio.ensure_future(anext(g)) for g in gens]
        await asyncio.sleep(0.05)
        sent = h.requests()
        assert sorted(i for i, _ in sent) == [0, 0, 1, 1]
        rids = [PromptRequest.decode(r).rid for _, r in sent]
        assert len(set(rids)) == 4
        assert all(PromptRequest.decode(r).prompt_ids.tolist() == [1, 2, 3] for _, r in sent)
        for task in tasks:   # cancelling a waiting request aborts it, like a client disconnecting
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        aborts = h.requests()
        assert sorted((i, Abort.decode(r).rid) for i, r in aborts) == sorted(
            (i, choice_rid(PromptRequest.decode(r).rid, 0)) for i, r in sent)
    run(test)


def test_closing_the_generator_aborts_unfinished_choices_on_the_same_ring() -> None:
    async def test(h: Harness) -> None:
        h.start()
        gen = h.client.stream(PromptRequest(messages=[("user", "hi")], params=params(), n=3))
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        [(ring, record)] = h.requests()
        rid = PromptRequest.decode(record).rid
        h.send_rows([(choice_rid(rid, 1), "done", FinishReason.STOP, [7])])
        assert (await first).index == 1
        await gen.aclose()
        aborts = h.requests()
        assert {i for i, _ in aborts} == {ring}
        assert sorted(Abort.decode(r).rid for _, r in aborts) == [choice_rid(rid, 0), choice_rid(rid, 2)]
    run(test)


def test_errors_raise_request_error() -> None:
    async def test(h: Harness) -> None:
        h.start()
        gen = h.client.stream(PromptRequest(text="x" * 10, params=params()))
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        rid = PromptRequest.decode(h.requests()[0][1]).rid
        h.detokenizer.write(Error(choice_rid(rid, 0), 400, "the prompt has 10 tokens ...").encode())
        with pytest.raises(RequestError) as exc:
            await first
        assert (exc.value.status, exc.value.message) == (400, "the prompt has 10 tokens ...")
    run(test)


def test_logprobs_carry_token_text_and_bytes() -> None:
    async def test(h: Harness) -> None:
        h.start()
        gen = h.client.stream(PromptRequest(text="x", params=params(logprobs=1)))
        first = asyncio.ensure_future(anext(gen))
        await asyncio.sleep(0.05)
        rid = PromptRequest.decode(h.requests()[0][1]).rid
        h.send_rows([(choice_rid(rid, 0), "", 0, [40])], logprobs=True)
        delta = await first
        h.send_rows([(choice_rid(rid, 0), "", FinishReason.ABORT, [])], logprobs=False)
        [lp] = delta.logprobs
        assert (lp.token_id, lp.logprob, lp.token_bytes, lp.token) == (40, -0.5, b"\xe4\xbd", "\ufffd")
        assert [(t.token_id, t.logprob, t.token) for t in lp.top_logprobs] == [(3, -2.0, "x")]
        last = await anext(gen)
        assert last.finish_reason == "abort" and last.logprobs == []   # asked for: a list, maybe empty
    run(test)


def test_refused_before_ready() -> None:
    async def test(h: Harness) -> None:
        with pytest.raises(RequestError) as exc:
            await anext(h.client.stream(PromptRequest(text="x", params=params())))
        assert exc.value.status == 503
        h.start()
        assert (h.client.model_name, h.client.max_model_len, h.client.vocab_size) == ("served-name", 128, 1000)
    run(test)


async def two_choices_after_a_delta(h: Harness):
    """A stream of a request with n=2 whose first choice has received one delta (already consumed)."""
    h.start()
    gen = h.client.stream(PromptRequest(text="x", params=params(), n=2))
    first = asyncio.ensure_future(anext(gen))
    await asyncio.sleep(0.05)
    rid = PromptRequest.decode(h.requests()[0][1]).rid
    h.send_rows([(choice_rid(rid, 0), "partial", 0, [5])])
    await first
    return gen


def test_end_streams_finishes_everything_with_abort() -> None:
    async def test(h: Harness) -> None:
        gen = await two_choices_after_a_delta(h)
        h.client.end_streams()
        rest = [d async for d in gen]
        assert sorted((d.index, d.finish_reason) for d in rest) == [(0, "abort"), (1, "abort")]
        assert not h.client.ready
    run(test)


def test_a_failure_ends_every_stream_with_an_error_not_a_finish() -> None:
    async def test(h: Harness) -> None:
        gen = await two_choices_after_a_delta(h)
        h.client.worker_died("scheduler")
        with pytest.raises(RequestError) as exc:
            await anext(gen)
        assert exc.value.status == 503 and "worker scheduler died" in exc.value.message
        assert h.client.dead_worker == "scheduler" and not h.client.ready
    run(test)


def test_a_request_too_large_for_the_ring_is_a_413_naming_its_field_not_a_ring() -> None:
    async def test(h: Harness) -> None:
        h.start()
        for request, field in ((PromptRequest(text="x" * (1 << 16), params=params()), "prompt"),
                               (PromptRequest(messages=[("user", "y" * (1 << 16))], params=params()), "messages")):
            with pytest.raises(RequestError) as exc:
                await anext(h.client.stream(request))
            assert exc.value.status == 413 and exc.value.param == field
            assert exc.value.message.startswith(f"{field}: ") and "minisrv-" not in exc.value.message
    run(test)


def test_stats_come_from_the_status_block() -> None:
    async def test(h: Harness) -> None:
        h.start()
        rng = random.Random(3)
        stats = SchedulerStats(rng.randrange(9), rng.randrange(9), rng.random(), 10, 4)
        StatusBlock(h.status.spec).publish_stats(stats)
        assert h.client.stats() == stats
    run(test)


def test_a_request_too_large_for_the_ring_is_refused_and_nothing_is_sent() -> None:
    async def test(h: Harness) -> None:
        h.start()
        with pytest.raises(RequestError) as exc:
            await anext(h.client.stream(PromptRequest(text="x" * 40000, params=params())))
        assert exc.value.status == 413
        assert h.requests() == []
    run(test)
