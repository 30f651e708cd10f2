"""A tokenizer worker process: PROMPT_REQUEST in, DETOKENIZE_REQUEST + n TOKENIZED_REQUEST records out.

For each request it renders the chat template (the model's or --chat-template), tokenizes, tells
the detokenizer about the request (before the scheduler can produce its first token), then sends
one TOKENIZED_REQUEST per choice. An ABORT travels on the same ring as its request, so it is
forwarded after that request's records and can never overtake them. With data-parallel scheduler replicas
(--dp-size) a ReplicaRouter picks each request's replica (minisrv/scheduler/routing.py); an ABORT goes to
every replica (the others ignore a request they do not have), and so does a FLUSH_CACHE.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from minisrv.ipc import RecordTooLarge
from minisrv.models.source import ModelSource
from minisrv.runtime.channels import ChannelSpec, RingCapacities
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker
from minisrv.scheduler.routing import ReplicaRouter, RoutingPolicy
from minisrv.scheduler.scheduler import prompt_leaves_no_room
from minisrv.tokenizer.prompts import PromptError, PromptTokenizer, load_prompt_tokenizer
from minisrv.wire.records import (Abort, DetokenizeRequest, Error, FlushCache, PromptRequest, Shutdown,
                                  TokenizedRequest)
from minisrv.wire.terms import choice_rid, choice_seed

logger = logging.getLogger(__name__)

# A choice's prompt logprobs reach the API server in one TEXT_DELTAS row: at most ~32 bytes each (id, logprob,
# rank, flags, the token's bytes), so this many fill at most a quarter of the 8 MiB text ring.
MAX_PROMPT_LOGPROB_ENTRIES = RingCapacities.text // 4 // 32


@dataclass(frozen=True)
class TokenizerChannels:
    requests: ChannelSpec                  # api -> this worker: PROMPT_REQUEST, ABORT, FLUSH_CACHE, SHUTDOWN
    to_schedulers: tuple[ChannelSpec, ...]  # TOKENIZED_REQUEST, ABORT, FLUSH_CACHE, SHUTDOWN (one per replica)
    to_detokenizer: ChannelSpec            # DETOKENIZE_REQUEST, ERROR, SHUTDOWN


class TokenizerLoop:
    def __init__(self, channels: TokenizerChannels, watch: ParentWatch, status: StatusBlock | None = None,
                 policy: RoutingPolicy = RoutingPolicy()) -> None:
        self.requests = channels.requests.open()
        self.to_schedulers = [spec.open() for spec in channels.to_schedulers]
        self.to_detokenizer = channels.to_detokenizer.open()
        self.watch = watch
        self.status = status   # the replicas' published load, read when routing
        self.router = ReplicaRouter(len(self.to_schedulers), policy) if len(self.to_schedulers) > 1 else None
        self.prompts: PromptTokenizer | None = None   # set once the tokenizer is loaded, before run()

    def run(self) -> None:
        """Serve until a SHUTDOWN record arrives (forwarded downstream) or the parent goes away."""
        while True:
            self.watch.check()
            records = self.requests.drain()
            if not records:
                self.requests.wait(IDLE_WAIT_S)
                continue
            for record in records:
                if isinstance(record, PromptRequest):
                    self.handle(record)
                elif isinstance(record, (Abort, FlushCache)):
                    for channel in self.to_schedulers:
                        channel.send(record)
                    if isinstance(record, FlushCache) and self.router is not None:
                        self.router.forget_prefixes()
                elif isinstance(record, Shutdown):
                    for channel in self.to_schedulers:
                        channel.send(record)
                    self.to_detokenizer.send(record)
                    return
                else:
                    logger.error("unexpected %s record on the request channel; ignored", record.KIND.name)

    def handle(self, req: PromptRequest) -> None:
        try:
            prompt_ids = self.prompts.request_token_ids(req)
        except PromptError as exc:
            self.to_detokenizer.send(Error(choice_rid(req.rid, 0), 400, str(exc)))
            return
        if req.truncate_prompt_tokens:
            prompt_ids = prompt_ids[-req.truncate_prompt_tokens:]
        problem = self.unservable(req, len(prompt_ids))
        if problem:   # refused here: its ids or logprobs might not even fit in a record
            self.to_detokenizer.send(Error(choice_rid(req.rid, 0), 400, problem))
            return
        try:
            self.to_detokenizer.send(DetokenizeRequest(
                rid=req.rid, n=req.n, stop=req.stop, echo=req.echo, skip_special_tokens=req.skip_special_tokens,
                include_stop_str_in_output=req.include_stop_str_in_output,
                prompt_ids=prompt_ids if req.echo else [],
                echo_logprobs=req.echo and req.params.prompt_logprobs is not None,
                stop_token_ids=req.params.stop_token_ids))
            # The n choices share one prompt, so the prefix cache lets them share its KV pages too.
            params = req.params
            self.to_schedulers[self.replica_for(prompt_ids, req.n)].send_many(
                TokenizedRequest(choice_rid(req.rid, i), replace(params, seed=choice_seed(params.seed, i)),
                                 prompt_ids, req.arrival_ns, req.priority)
                for i in range(req.n))
        except RecordTooLarge as exc:   # a context too long for the rings: refuse it, never die of it
            for i in range(req.n):
                self.to_detokenizer.send(Error(choice_rid(req.rid, i), 400, (
                    f"the prompt's {len(prompt_ids)} tokens take {exc.length} bytes in a record, more than the "
                    f"{exc.limit} this server's rings carry; shorten it, or set truncate_prompt_tokens")))

    def unservable(self, req: PromptRequest, num_prompt_tokens: int) -> str | None:
        """Why the rings cannot carry this request or its answer, or None."""
        context = self.status.model().max_model_len if self.status is not None else 0
        problem = prompt_leaves_no_room(num_prompt_tokens, context) if context else None
        if problem:
            return f"{problem}; shorten it, or set truncate_prompt_tokens"
        k = req.params.prompt_logprobs
        entries = num_prompt_tokens * (1 + (k or 0)) * req.n
        if k is not None and entries > MAX_PROMPT_LOGPROB_ENTRIES:
            return (f"prompt_logprobs: {num_prompt_tokens} prompt tokens x {1 + k} logprobs each x n={req.n} are "
                    f"{entries} logprobs, more than the {MAX_PROMPT_LOGPROB_ENTRIES} one response may carry; ask for "
                    "fewer alternatives or send a shorter prompt")
        return None

    def replica_for(self, prompt_ids: list[int], choices: int) -> int:
        if self.router is None:
            return 0
        for replica in range(len(self.to_schedulers)):
            self.router.observe(replica, self.status.stats(replica))
        return self.router.route(prompt_ids, choices)

    def close(self) -> None:
        for channel in (self.requests, *self.to_schedulers, self.to_detokenizer):
            channel.close()


def main(info: WorkerInfo, source: ModelSource, chat_template: str | None, channels: TokenizerChannels,
         policy: RoutingPolicy = RoutingPolicy()) -> None:
    """Entry point of a spawned tokenizer worker."""

    def set_up(loop: TokenizerLoop, status: StatusBlock) -> None:
        loop.prompts = load_prompt_tokenizer(source, chat_template)

    serve_worker(info, lambda status, watch: TokenizerLoop(channels, watch, status, policy), set_up)
