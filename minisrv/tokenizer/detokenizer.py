"""The detokenizer process: TOKENS records (one per scheduler step) in, TEXT records (one per batch) out.

Per choice it keeps an IncrementalDetokenizer (UTF-8-safe deltas, stop strings). When a stop string
matches, the choice finishes with "stop" here and an ABORT tells the scheduler to free its pages; rows
the scheduler sends for it afterwards are dropped. ERROR records from the tokenizers and the scheduler
pass through to the API server, in order with the text.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from minisrv.config import EngineConfig
from minisrv.ipc import RingReader, RingSpec, RingWriter
from minisrv.ipc.records import Abort, DetokRequest, Error, Kind, Text, Tokens, peek_kind
from minisrv.ipc.wait_any import check_fifo_readers, wait_any
from minisrv.scheduler.request import FinishReason
from minisrv.status_block import StatusBlock
from minisrv.tokenizer.choices import choice_rid
from minisrv.tokenizer.incremental import IncrementalDetokenizer, TokenTexts
from minisrv.tokenizer.loading import load_fast_tokenizer
from minisrv.worker_process import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetokenizerRings:
    from_tokenizers: tuple[RingSpec, ...]   # DETOK_REQUEST, ERROR, SHUTDOWN (one ring per tokenizer worker)
    from_scheduler: RingSpec                # TOKENS, ERROR
    to_api: RingSpec                        # TEXT, ERROR
    to_scheduler: RingSpec                  # ABORT when a stop string matched


@dataclass
class TextBatch:
    """The rows of one TEXT record, built up column by column."""

    rids: list[int] = field(default_factory=list)
    finish_reasons: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)
    cached_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    token_logprobs: list[float] = field(default_factory=list)   # NaN: no logprobs asked for
    top_counts: list[int] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    token_raw: list[bytes] = field(default_factory=list)
    top_raw: list[bytes] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.rids)

    def encode(self) -> bytearray:
        # Every row lists its new token ids (the API reports them); token bytes travel only when some
        # row asked for logprobs (then b"" stands for the tokens of rows that did not).
        with_logprobs = any(not math.isnan(x) for x in self.token_logprobs)
        return Text(rids=self.rids, finish_reasons=self.finish_reasons, prompt_tokens=self.prompt_tokens,
                    cached_tokens=self.cached_tokens, completion_tokens=self.completion_tokens, texts=self.texts,
                    num_tokens=self.num_tokens, token_ids=self.token_ids, token_logprobs=self.token_logprobs,
                    top_counts=self.top_counts, top_ids=self.top_ids, top_logprobs=self.top_logprobs,
                    token_texts=self.token_raw + self.top_raw if with_logprobs else []).encode()


@dataclass
class ChoiceStream:
    detok: IncrementalDetokenizer
    prefix: str = ""      # the prompt's text for echo, sent with the choice's first row


class Detokenizer:
    """The per-choice state machine, free of rings (the process loop below feeds it)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_texts = TokenTexts(tokenizer)
        self.streams: dict[int, ChoiceStream] = {}

    def add_request(self, req: DetokRequest) -> None:
        prefix = ""
        if req.echo:
            prefix = self.tokenizer.decode(req.prompt_ids.tolist(), skip_special_tokens=req.skip_special_tokens)
        for index in range(req.n):
            detok = IncrementalDetokenizer(self.tokenizer, req.stop, req.skip_special_tokens)
            self.streams[choice_rid(req.rid, index)] = ChoiceStream(detok, prefix)

    def drop(self, rid: int) -> None:
        self.streams.pop(rid, None)

    def process(self, step: Tokens, out: TextBatch) -> list[int]:
        """Append a row to `out` for every row of `step` that belongs to a live choice; return the ids
        of choices a stop string just finished (the scheduler must be told to abort them)."""
        stopped = []
        top_counts = step.top_counts.tolist()
        top_ids, top_logprobs = step.top_ids.tolist(), step.top_logprobs.tolist()
        top_start = 0
        counts = zip(step.prompt_tokens.tolist(), step.cached_tokens.tolist(), step.output_tokens.tolist())
        for row, (rid, token, reason, logprob, (prompt, cached, output)) in enumerate(zip(
                step.rids.tolist(), step.token_ids.tolist(), step.finish_reasons.tolist(), step.logprobs.tolist(),
                counts)):
            tops = slice(top_start, top_start + top_counts[row])
            top_start = tops.stop
            stream = self.streams.get(rid)
            if stream is None:   # finished here by a stop string, or refused: nothing to report
                continue
            text = stream.detok.step(token) if token >= 0 else ""
            if stream.detok.stopped:
                if reason == FinishReason.NONE:
                    stopped.append(rid)
                reason = FinishReason.STOP
            elif reason != FinishReason.NONE:
                text += stream.detok.flush()
            if stream.prefix:
                text, stream.prefix = stream.prefix + text, ""
            if reason != FinishReason.NONE:
                del self.streams[rid]
            out.rids.append(rid)
            out.finish_reasons.append(reason)
            out.prompt_tokens.append(prompt)
            out.cached_tokens.append(cached)
            out.completion_tokens.append(output)
            out.texts.append(text)
            if token < 0:
                out.num_tokens.append(0)
                continue
            out.num_tokens.append(1)
            out.token_ids.append(token)
            out.token_logprobs.append(logprob)
            has_logprobs = not math.isnan(logprob)
            out.token_raw.append(self.token_texts[token].raw if has_logprobs else b"")
            out.top_counts.append(top_counts[row])
            out.top_ids += top_ids[tops]
            out.top_logprobs += top_logprobs[tops]
            out.top_raw += [self.token_texts[t].raw for t in top_ids[tops]]
        return stopped


class DetokenizerProcess:
    def __init__(self, rings: DetokenizerRings, watch: ParentWatch) -> None:
        self.from_tokenizers = [RingReader(spec) for spec in rings.from_tokenizers]
        self.from_scheduler = RingReader(rings.from_scheduler)
        self.to_api = RingWriter(rings.to_api)
        self.to_scheduler = RingWriter(rings.to_scheduler)
        self.inputs = [*self.from_tokenizers, self.from_scheduler]
        check_fifo_readers(self.inputs)
        self.watch = watch
        self.core: Detokenizer | None = None   # set once the tokenizer is loaded, before run()

    def run(self) -> None:
        """Serve until a SHUTDOWN record arrives or the parent goes away."""
        while True:
            if not self.drain_tokenizers():
                return
            batch, stopped = TextBatch(), []
            for record in self.from_scheduler.drain():
                kind = peek_kind(record)
                if kind is Kind.TOKENS:
                    # A choice's DETOK_REQUEST was published before its GENERATE, hence before its tokens:
                    # draining the tokenizer rings now guarantees every row's choice is known.
                    if not self.drain_tokenizers():
                        return
                    stopped += self.core.process(Tokens.decode(record), batch)
                elif kind is Kind.ERROR:
                    self.flush(batch)
                    batch = TextBatch()
                    self.forward_error(record)
                elif kind is Kind.SHUTDOWN:
                    return
            self.flush(batch)
            if stopped:
                self.to_scheduler.write_many(Abort(rid).encode() for rid in stopped)
            if not batch and not stopped:
                self.watch.check()
                wait_any(self.inputs, IDLE_WAIT_S)

    def drain_tokenizers(self) -> bool:
        """Take in new requests and tokenizer errors; False once a SHUTDOWN arrived."""
        for ring in self.from_tokenizers:
            for record in ring.drain():
                kind = peek_kind(record)
                if kind is Kind.DETOK_REQUEST:
                    self.core.add_request(DetokRequest.decode(record))
                elif kind is Kind.ERROR:
                    self.forward_error(record)
                elif kind is Kind.SHUTDOWN:
                    return False
        return True

    def forward_error(self, record: bytes) -> None:
        self.core.drop(Error.decode(record).rid)
        self.to_api.write(record)

    def flush(self, batch: TextBatch) -> None:
        if batch:
            self.to_api.write(batch.encode())

    def close(self) -> None:
        for ring in (*self.inputs, self.to_api, self.to_scheduler):
            ring.close()


def main(info: WorkerInfo, config: EngineConfig, rings: DetokenizerRings) -> None:
    """Entry point of the spawned detokenizer."""

    def set_up(process: DetokenizerProcess, status: StatusBlock) -> None:
        process.core = Detokenizer(load_fast_tokenizer(config))

    serve_worker(info, lambda status, watch: DetokenizerProcess(rings, watch), set_up)
