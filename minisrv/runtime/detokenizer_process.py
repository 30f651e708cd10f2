"""The detokenizer process: STEP_TOKENS records (one per scheduler step) in, TEXT_DELTAS records (one per
batch) out, around the Detokenizer state machine (minisrv/tokenizer/detokenizer.py).

A stop string that matched becomes an ABORT to the scheduler that ran the choice (one of several with
--dp-size), which frees its pages. ERROR records from the tokenizers and the schedulers pass through to the
API server, in order with the text. With several API server processes (--api-server-count) each gets the
rows and errors of the requests it numbered (minisrv/wire/terms.py), a batch of its own per step.
"""
from __future__ import annotations

from dataclasses import dataclass

from minisrv.models.source import ModelSource
from minisrv.runtime.channels import ChannelSpec, wait_any
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker
from minisrv.tokenizer.detokenizer import Detokenizer
from minisrv.tokenizer.loading import load_fast_tokenizer
from minisrv.wire.records import Abort, DetokenizeRequest, Error, Shutdown, StepTokens, TextDeltas
from minisrv.wire.terms import api_server_of


@dataclass(frozen=True)
class DetokenizerChannels:
    from_tokenizers: tuple[ChannelSpec, ...]   # DETOKENIZE_REQUEST, ERROR, SHUTDOWN (one per tokenizer worker)
    from_schedulers: tuple[ChannelSpec, ...]   # STEP_TOKENS, ERROR (one per scheduler replica)
    to_api: tuple[ChannelSpec, ...]            # TEXT_DELTAS, ERROR (one per API server process)
    to_schedulers: tuple[ChannelSpec, ...]     # ABORT when a stop string matched (one per replica)


class DetokenizerLoop:
    def __init__(self, channels: DetokenizerChannels, watch: ParentWatch) -> None:
        self.from_tokenizers = [spec.open() for spec in channels.from_tokenizers]
        self.from_schedulers = [spec.open() for spec in channels.from_schedulers]
        self.to_api = [spec.open() for spec in channels.to_api]
        self.to_schedulers = [spec.open() for spec in channels.to_schedulers]
        self.inputs = [*self.from_tokenizers, *self.from_schedulers]
        self.watch = watch
        self.core: Detokenizer | None = None   # set once the tokenizer is loaded, before run()

    def run(self) -> None:
        """Serve until a SHUTDOWN record arrives or the parent goes away."""
        while True:
            if not self.drain_tokenizers():
                return
            batches, stopped = self.new_batches(), False
            for replica, channel in enumerate(self.from_schedulers):
                for record in channel.drain():
                    if isinstance(record, StepTokens):
                        # A choice's DETOKENIZE_REQUEST was published before its TOKENIZED_REQUEST, hence before
                        # its tokens: draining the tokenizer channels now guarantees every row's choice is known.
                        if not self.drain_tokenizers():
                            return
                        rids = self.core.process(record, batches)
                        if rids:
                            self.to_schedulers[replica].send_many(Abort(rid) for rid in rids)
                            stopped = True
                    elif isinstance(record, Error):
                        self.flush(batches)
                        batches = self.new_batches()
                        self.forward_error(record)
                    elif isinstance(record, Shutdown):
                        return
            sent = self.flush(batches)
            self.watch.check()
            if not sent and not stopped:
                wait_any(self.inputs, IDLE_WAIT_S)

    def drain_tokenizers(self) -> bool:
        """Take in new requests and tokenizer errors; False once a SHUTDOWN arrived."""
        for channel in self.from_tokenizers:
            for record in channel.drain():
                if isinstance(record, DetokenizeRequest):
                    self.core.add_request(record)
                elif isinstance(record, Error):
                    self.forward_error(record)
                elif isinstance(record, Shutdown):
                    return False
        return True

    def new_batches(self) -> list[TextDeltas]:
        return [TextDeltas() for _ in self.to_api]

    def forward_error(self, error: Error) -> None:
        self.core.drop(error.rid)
        self.to_api[api_server_of(error.rid, len(self.to_api))].send(error)

    def flush(self, batches: list[TextDeltas]) -> bool:
        """Send every non-empty batch to its API server process; whether any was."""
        sent = False
        for batch, channel in zip(batches, self.to_api):
            if batch.rids:
                channel.send(batch)
                sent = True
        return sent

    def close(self) -> None:
        for channel in (*self.inputs, *self.to_api, *self.to_schedulers):
            channel.close()


def main(info: WorkerInfo, source: ModelSource, channels: DetokenizerChannels, stream_interval: int = 1) -> None:
    """Entry point of the spawned detokenizer."""

    def set_up(loop: DetokenizerLoop, status: StatusBlock) -> None:
        loop.core = Detokenizer(load_fast_tokenizer(source), stream_interval)

    serve_worker(info, lambda status, watch: DetokenizerLoop(channels, watch), set_up)
