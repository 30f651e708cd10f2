"""The detokenizer process: STEP_TOKENS records (one per scheduler step) in, TEXT_DELTAS records (one per
batch) out, around the Detokenizer state machine (minisrv/tokenizer/detokenizer.py).

A stop string that matched becomes an ABORT to the scheduler, which frees the choice's pages. ERROR
records from the tokenizers and the scheduler pass through to the API server, in order with the text.
"""
from __future__ import annotations

from dataclasses import dataclass

from minisrv.ipc import RingReader, RingSpec, RingWriter
from minisrv.ipc.wait_any import check_fifo_readers, wait_any
from minisrv.models.source import ModelSource
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker
from minisrv.tokenizer.detokenizer import Detokenizer
from minisrv.tokenizer.loading import load_fast_tokenizer
from minisrv.wire.records import Abort, DetokenizeRequest, Error, Kind, StepTokens, TextDeltas, peek_kind


@dataclass(frozen=True)
class DetokenizerRings:
    from_tokenizers: tuple[RingSpec, ...]   # DETOKENIZE_REQUEST, ERROR, SHUTDOWN (one ring per tokenizer worker)
    from_scheduler: RingSpec                # STEP_TOKENS, ERROR
    to_api: RingSpec                        # TEXT_DELTAS, ERROR
    to_scheduler: RingSpec                  # ABORT when a stop string matched


class DetokenizerLoop:
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
            batch, stopped = TextDeltas(), []
            for record in self.from_scheduler.drain():
                kind = peek_kind(record)
                if kind is Kind.STEP_TOKENS:
                    # A choice's DETOKENIZE_REQUEST was published before its TOKENIZED_REQUEST, hence before
                    # its tokens: draining the tokenizer rings now guarantees every row's choice is known.
                    if not self.drain_tokenizers():
                        return
                    stopped += self.core.process(StepTokens.decode(record), batch)
                elif kind is Kind.ERROR:
                    self.flush(batch)
                    batch = TextDeltas()
                    self.forward_error(record)
                elif kind is Kind.SHUTDOWN:
                    return
            self.flush(batch)
            if stopped:
                self.to_scheduler.write_many(Abort(rid).encode() for rid in stopped)
            if not batch.rids and not stopped:
                self.watch.check()
                wait_any(self.inputs, IDLE_WAIT_S)

    def drain_tokenizers(self) -> bool:
        """Take in new requests and tokenizer errors; False once a SHUTDOWN arrived."""
        for ring in self.from_tokenizers:
            for record in ring.drain():
                kind = peek_kind(record)
                if kind is Kind.DETOKENIZE_REQUEST:
                    self.core.add_request(DetokenizeRequest.decode(record))
                elif kind is Kind.ERROR:
                    self.forward_error(record)
                elif kind is Kind.SHUTDOWN:
                    return False
        return True

    def forward_error(self, record: bytes) -> None:
        self.core.drop(Error.decode(record).rid)
        self.to_api.write(record)

    def flush(self, batch: TextDeltas) -> None:
        if batch.rids:
            self.to_api.write(batch.encode())

    def close(self) -> None:
        for ring in (*self.inputs, self.to_api, self.to_scheduler):
            ring.close()


def main(info: WorkerInfo, source: ModelSource, rings: DetokenizerRings) -> None:
    """Entry point of the spawned detokenizer."""

    def set_up(loop: DetokenizerLoop, status: StatusBlock) -> None:
        loop.core = Detokenizer(load_fast_tokenizer(source))

    serve_worker(info, lambda status, watch: DetokenizerLoop(rings, watch), set_up)
