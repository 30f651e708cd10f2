"""The tokenizer worker's loop over real rings, in one process (the test plays api, scheduler, detokenizer)."""
from __future__ import annotations

import os
import random
from dataclasses import replace

import numpy as np
import pytest

from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.channels import RingChannel
from minisrv.runtime.tokenizer_process import TokenizerChannels, TokenizerLoop
from minisrv.runtime.worker import ParentWatch, WorkerInfo
from minisrv.sampling_params import SamplingParams
from minisrv.tokenizer.prompts import PromptTokenizer
from minisrv.wire.records import (Abort, DetokenizeRequest, Error, Kind, PromptRequest, Shutdown, TokenizedRequest,
                                  peek_kind)
from minisrv.wire.terms import choice_rid
from tests.conftest import CHATML, random_text


@pytest.fixture
def pipeline(hf_tokenizer):
    """(api end of the request ring, worker, scheduler's reader, detokenizer's reader)."""
    with RingSet() as rings:
        requests = rings.create("req", 1 << 16)
        tokenized = rings.create("tok", 1 << 16, wakeup=Wakeup.FIFO)
        detok = rings.create("detok", 1 << 16, wakeup=Wakeup.FIFO)
        status = StatusBlock.create(f"{rings.prefix}-status", num_workers=1)
        info = WorkerInfo("tokenizer-0", 0, os.getppid(), status.spec, "info")
        channels = TokenizerChannels(RingChannel(requests.reader), (RingChannel(tokenized.producer),),
                                     RingChannel(detok.producer))
        worker = TokenizerLoop(channels, ParentWatch(info))
        worker.prompts = PromptTokenizer(hf_tokenizer, CHATML)
        ends = RingWriter(requests.producer), RingReader(tokenized.reader), RingReader(detok.reader)
        yield ends[0], worker, ends[1], ends[2]
        for end in (*ends, worker):
            end.close()
        status.unlink()
        status.close()


def serve(api: RingWriter, worker: TokenizerLoop, *records: bytes) -> None:
    for record in records:
        api.write(record)
    api.write(Shutdown().encode())
    worker.run()   # returns at the SHUTDOWN


def test_a_chat_request_becomes_detokenize_request_then_n_tokenized_requests(pipeline, hf_tokenizer) -> None:
    api, worker, scheduler, detokenizer = pipeline
    rng = random.Random(4)
    messages = [("user", random_text(rng, 15))]
    params = SamplingParams(temperature=0.5, max_tokens=5, seed=rng.randrange(1 << 40))
    serve(api, worker, PromptRequest(7, params=params, messages=messages, n=3, stop=["x"], priority=-2).encode())
    expected_ids = PromptTokenizer(hf_tokenizer, CHATML).token_ids(messages, is_chat=True)
    [detok_record, shutdown] = detokenizer.drain()
    detok_req = DetokenizeRequest.decode(detok_record)
    assert (detok_req.rid, detok_req.n, detok_req.stop) == (7, 3, ["x"])
    assert peek_kind(shutdown) is Kind.SHUTDOWN
    *generates, shutdown = scheduler.drain()
    assert peek_kind(shutdown) is Kind.SHUTDOWN
    decoded = [TokenizedRequest.decode(g) for g in generates]
    assert [(g.rid, g.priority) for g in decoded] == [(choice_rid(7, i), -2) for i in range(3)]
    assert all(g.prompt_ids.tolist() == expected_ids for g in decoded)
    # Same parameters, but each choice its own seed: a seed fixes the n samples, which still differ.
    assert decoded[0].params == params
    assert all(replace(g.params, seed=params.seed) == params for g in decoded)
    assert len({g.params.seed for g in decoded}) == 3


def test_token_prompts_pass_through_and_echo_sends_them_to_the_detokenizer(pipeline) -> None:
    api, worker, scheduler, detokenizer = pipeline
    ids = np.array(random.Random(5).sample(range(400), 12), np.int32)
    serve(api, worker, PromptRequest(8, prompt_ids=ids, echo=True).encode())
    detok_req = DetokenizeRequest.decode(detokenizer.drain()[0])
    assert detok_req.echo and detok_req.prompt_ids.tolist() == ids.tolist()
    assert TokenizedRequest.decode(scheduler.drain()[0]).prompt_ids.tolist() == ids.tolist()


def test_aborts_follow_their_request_to_the_scheduler(pipeline) -> None:
    api, worker, scheduler, _ = pipeline
    serve(api, worker, PromptRequest(9, text="hello", n=2).encode(),
          Abort(choice_rid(9, 0)).encode(), Abort(choice_rid(9, 1)).encode())
    kinds = [peek_kind(r) for r in scheduler.drain()]
    assert kinds == [Kind.TOKENIZED_REQUEST, Kind.TOKENIZED_REQUEST, Kind.ABORT, Kind.ABORT, Kind.SHUTDOWN]


def test_no_max_tokens_travels_as_none_for_the_scheduler_to_resolve(pipeline) -> None:
    api, worker, scheduler, _ = pipeline
    text = random_text(random.Random(6), 20)
    serve(api, worker, PromptRequest(10, params=SamplingParams(max_tokens=None), text=text).encode())
    assert TokenizedRequest.decode(scheduler.drain()[0]).params.max_tokens is None


def test_prompt_errors_go_to_the_detokenizer_and_nothing_to_the_scheduler(pipeline) -> None:
    api, worker, scheduler, detokenizer = pipeline
    serve(api, worker, PromptRequest(11, messages=[("tool", "x")]).encode())
    errors = [Error.decode(r) for r in detokenizer.drain()[:-1]]
    assert [(e.rid, e.status) for e in errors] == [(choice_rid(11, 0), 400)]
    assert "unknown role tool" in errors[0].message
    assert [peek_kind(r) for r in scheduler.drain()] == [Kind.SHUTDOWN]


def test_truncate_prompt_tokens_keeps_the_last_tokens_for_engine_and_echo(pipeline, hf_tokenizer) -> None:
    api, worker, scheduler, detokenizer = pipeline
    text = random_text(random.Random(12), 40)
    full = PromptTokenizer(hf_tokenizer, CHATML).token_ids(text, is_chat=False)
    serve(api, worker, PromptRequest(12, text=text, echo=True, truncate_prompt_tokens=5,
                                     include_stop_str_in_output=True).encode(),
          PromptRequest(13, text=text, truncate_prompt_tokens=10 * len(full)).encode())
    detok_req = DetokenizeRequest.decode(detokenizer.drain()[0])
    assert detok_req.prompt_ids.tolist() == full[-5:] and detok_req.include_stop_str_in_output
    short, whole = (TokenizedRequest.decode(r) for r in scheduler.drain()[:2])
    assert short.prompt_ids.tolist() == full[-5:] and whole.prompt_ids.tolist() == full


def test_chat_template_kwargs_reach_the_chat_template(pipeline, hf_tokenizer) -> None:
    from minisrv.wire.terms import pack_template_value

    api, worker, scheduler, _ = pipeline
    worker.prompts = PromptTokenizer(hf_tokenizer, CHATML + "{% if flag %}[flag={{ flag }}]{% endif %}")
    serve(api, worker, PromptRequest(14, messages=[("user", "hi")], template_kwarg_names=["flag"],
                                     template_kwarg_values=[pack_template_value(7)]).encode())
    ids = TokenizedRequest.decode(scheduler.drain()[0]).prompt_ids.tolist()
    assert hf_tokenizer.decode(ids).endswith("[flag=7]")
