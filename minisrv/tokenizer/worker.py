"""A tokenizer worker process: TEXT_REQUEST in, DETOK_REQUEST + n GENERATE records out.

For each request it renders the chat template (the model's or --chat-template), tokenizes, tells
the detokenizer about the request (before the scheduler can produce its first token), then sends
one GENERATE per choice. An ABORT travels on the same ring as its request, so it is forwarded
after that request's GENERATE records and can never overtake them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from minisrv.config import EngineConfig
from minisrv.ipc import RingReader, RingSpec, RingTimeout, RingWriter
from minisrv.ipc.records import DetokRequest, Error, Generate, Kind, Shutdown, TextRequest, peek_kind
from minisrv.status_block import StatusBlock
from minisrv.tokenizer.choices import choice_rid, choice_seed
from minisrv.tokenizer.loading import load_tokenizer
from minisrv.tokenizer.prompts import PromptError, PromptTokenizer, resolve_chat_template
from minisrv.worker_process import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerRings:
    requests: RingSpec          # api -> this worker: TEXT_REQUEST, ABORT, SHUTDOWN
    to_scheduler: RingSpec      # GENERATE, ABORT, SHUTDOWN
    to_detokenizer: RingSpec    # DETOK_REQUEST, ERROR, SHUTDOWN


class TokenizerWorker:
    def __init__(self, rings: TokenizerRings, prompts: PromptTokenizer | None, status: StatusBlock,
                 watch: ParentWatch) -> None:
        self.requests = RingReader(rings.requests)
        self.to_scheduler = RingWriter(rings.to_scheduler)
        self.to_detokenizer = RingWriter(rings.to_detokenizer)
        self.prompts = prompts      # set once the tokenizer is loaded, before run()
        self.status = status
        self.watch = watch

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
                if kind is Kind.TEXT_REQUEST:
                    self.handle(TextRequest.decode(record))
                elif kind is Kind.ABORT:
                    self.to_scheduler.write(record)
                elif kind is Kind.SHUTDOWN:
                    shutdown = Shutdown().encode()
                    self.to_scheduler.write(shutdown)
                    self.to_detokenizer.write(shutdown)
                    return
                else:
                    logger.error("unexpected %s record on the request ring; ignored", kind.name)

    def handle(self, req: TextRequest) -> None:
        first_choice = choice_rid(req.rid, 0)
        try:
            prompt_ids = self.token_ids(req)
            params = req.params
            if req.max_tokens_from_context:
                params.max_tokens = self.room_for_output(len(prompt_ids))
                params.validate()
        except (PromptError, ValueError) as exc:
            self.to_detokenizer.write(Error(first_choice, 400, str(exc)).encode())
            return
        self.to_detokenizer.write(DetokRequest(
            req.rid, len(prompt_ids), req.n, req.echo, req.skip_special_tokens, req.stop,
            prompt_ids if req.echo else ()).encode())
        # The n choices share one prompt, so the prefix cache lets them share its KV pages too.
        self.to_scheduler.write_many(
            Generate(choice_rid(req.rid, i), replace(params, seed=choice_seed(params.seed, i)), prompt_ids).encode()
            for i in range(req.n))

    def token_ids(self, req: TextRequest) -> list[int]:
        if req.messages is not None:
            return self.prompts.token_ids(req.messages, is_chat=True, add_generation_prompt=req.add_generation_prompt)
        if req.prompt_ids is not None:
            return req.prompt_ids.tolist()
        return self.prompts.token_ids(req.text, is_chat=False)

    def room_for_output(self, num_prompt_tokens: int) -> int:
        """max_tokens for a request that gave none: the rest of the context (OpenAI chat semantics)."""
        max_model_len = self.status.model().max_model_len
        if num_prompt_tokens >= max_model_len:
            raise PromptError(f"the prompt has {num_prompt_tokens} tokens, which leaves no room to generate: "
                              f"the context length is {max_model_len}")
        return max_model_len - num_prompt_tokens

    def close(self) -> None:
        for ring in (self.requests, self.to_scheduler, self.to_detokenizer):
            ring.close()


def main(info: WorkerInfo, config: EngineConfig, rings: TokenizerRings) -> None:
    """Entry point of a spawned tokenizer worker."""

    def set_up(worker: TokenizerWorker, status: StatusBlock) -> None:
        tokenizer = load_tokenizer(config)
        worker.prompts = PromptTokenizer(tokenizer, resolve_chat_template(config.chat_template, tokenizer))

    serve_worker(info, lambda status, watch: TokenizerWorker(rings, None, status, watch), set_up)
