"""A tokenizer worker process: PROMPT_REQUEST in, DETOKENIZE_REQUEST + n TOKENIZED_REQUEST records out.

For each request it renders the chat template (the model's or --chat-template), tokenizes, tells
the detokenizer about the request (before the scheduler can produce its first token), then sends
one TOKENIZED_REQUEST per choice. An ABORT travels on the same ring as its request, so it is
forwarded after that request's records and can never overtake them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from minisrv.ipc import RingReader, RingSpec, RingTimeout, RingWriter
from minisrv.models.source import ModelSource
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker
from minisrv.tokenizer.loading import load_tokenizer
from minisrv.tokenizer.prompts import PromptError, PromptTokenizer, resolve_chat_template
from minisrv.wire.records import DetokenizeRequest, Error, Kind, PromptRequest, Shutdown, TokenizedRequest, peek_kind
from minisrv.wire.terms import choice_rid, choice_seed

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerRings:
    requests: RingSpec          # api -> this worker: PROMPT_REQUEST, ABORT, SHUTDOWN
    to_scheduler: RingSpec      # TOKENIZED_REQUEST, ABORT, SHUTDOWN
    to_detokenizer: RingSpec    # DETOKENIZE_REQUEST, ERROR, SHUTDOWN


class TokenizerLoop:
    def __init__(self, rings: TokenizerRings, watch: ParentWatch) -> None:
        self.requests = RingReader(rings.requests)
        self.to_scheduler = RingWriter(rings.to_scheduler)
        self.to_detokenizer = RingWriter(rings.to_detokenizer)
        self.watch = watch
        self.prompts: PromptTokenizer | None = None   # set once the tokenizer is loaded, before run()

    def run(self) -> None:
        """Serve until a SHUTDOWN record arrives (forwarded downstream) or the parent goes away."""
        while True:
            records = self.requests.drain()
            if not records:
                self.watch.check()
                try:
                    self.requests.wait(IDLE_WAIT_S)
                except RingTimeout:
                    pass
                continue
            for record in records:
                kind = peek_kind(record)
                if kind is Kind.PROMPT_REQUEST:
                    self.handle(PromptRequest.decode(record))
                elif kind is Kind.ABORT:
                    self.to_scheduler.write(record)
                elif kind is Kind.SHUTDOWN:
                    shutdown = Shutdown().encode()
                    self.to_scheduler.write(shutdown)
                    self.to_detokenizer.write(shutdown)
                    return
                else:
                    logger.error("unexpected %s record on the request ring; ignored", kind.name)

    def handle(self, req: PromptRequest) -> None:
        try:
            prompt_ids = self.token_ids(req)
        except PromptError as exc:
            self.to_detokenizer.write(Error(choice_rid(req.rid, 0), 400, str(exc)).encode())
            return
        self.to_detokenizer.write(DetokenizeRequest(
            req.rid, req.n, req.stop, req.echo, req.skip_special_tokens, prompt_ids if req.echo else []).encode())
        # The n choices share one prompt, so the prefix cache lets them share its KV pages too.
        params = req.params
        self.to_scheduler.write_many(
            TokenizedRequest(choice_rid(req.rid, i), replace(params, seed=choice_seed(params.seed, i)),
                             prompt_ids).encode()
            for i in range(req.n))

    def token_ids(self, req: PromptRequest) -> list[int]:
        if req.messages is not None:
            return self.prompts.token_ids(req.messages, is_chat=True, add_generation_prompt=req.add_generation_prompt)
        if req.prompt_ids is not None:
            return req.prompt_ids.tolist()
        return self.prompts.token_ids(req.text, is_chat=False)

    def close(self) -> None:
        for ring in (self.requests, self.to_scheduler, self.to_detokenizer):
            ring.close()


def main(info: WorkerInfo, source: ModelSource, chat_template: str | None, rings: TokenizerRings) -> None:
    """Entry point of a spawned tokenizer worker."""

    def set_up(loop: TokenizerLoop, status: StatusBlock) -> None:
        tokenizer = load_tokenizer(source)
        loop.prompts = PromptTokenizer(tokenizer, resolve_chat_template(chat_template, tokenizer))

    serve_worker(info, lambda status, watch: TokenizerLoop(rings, watch), set_up)
