"""The scheduler process: the engine loop between the tokenizer rings and the detokenizer.

Between steps it polls its input rings (TOKENIZED_REQUEST / ABORT from the tokenizer workers, ABORT
from the detokenizer for stop strings): shared-memory loads only, no system call when nothing is
there. With no work left it sleeps on the rings' doorbells. Each step's news goes out as one
STEP_TOKENS record, and the engine's stats go to the status block for /metrics. A request the engine
refuses (ValueError: too long for the context, token ids outside the vocabulary, a grammar llguidance
rejects...) comes back as an ERROR record. A request with a grammar first has it compiled on a worker
thread (GrammarCompiles), so that a large grammar never holds up the steps of the requests running.
"""
from __future__ import annotations

import logging
import math
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

from minisrv.config import EngineConfig
from minisrv.models.source import ModelSource
from minisrv.runtime.channels import ChannelSpec, wait_any
from minisrv.runtime.status_block import ModelFacts, StatusBlock
from minisrv.runtime.tensor_parallel import TPGroup, TPLeader, load_rank_engine
from minisrv.runtime.worker import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker
from minisrv.scheduler.request import RequestOutput, SampleResult
from minisrv.tokenizer.loading import load_fast_tokenizer
from minisrv.wire.records import Abort, Error, FlushCache, Shutdown, StepTokens, TokenizedRequest
from minisrv.wire.terms import FinishReason

if TYPE_CHECKING:
    from minisrv.engine.grammar import RequestGrammar
    from minisrv.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# The engine names requests by their internal id in its messages; the client never sees those ids.
_INTERNAL_RID = re.compile(r"^request \d+: ")
COMPILE_POLL_S = 0.001   # how often an idle loop looks for finished grammar compiles


@dataclass(frozen=True)
class SchedulerChannels:
    from_tokenizers: tuple[ChannelSpec, ...]   # TOKENIZED_REQUEST, ABORT, FLUSH_CACHE, SHUTDOWN (one per tokenizer)
    from_detokenizer: ChannelSpec              # ABORT (stop strings)
    to_detokenizer: ChannelSpec                # STEP_TOKENS, ERROR
    to_other_ranks: ChannelSpec | None = None  # tensor parallelism: TOKENIZED_REQUEST, ABORT, STEP, SHUTDOWN


def step_tokens(outputs: list[RequestOutput]) -> StepTokens:
    """One STEP_TOKENS record for a step: per request, a row per prompt logprob computed, then a row per new
    token, or one row with token -1 for a bare finish."""
    record = StepTokens()
    for out in outputs:
        for sample in out.prompt_samples:
            _add_row(record, out, sample.token_id, sample, FinishReason.NONE, out.num_output_tokens, in_prompt=True)
        samples = out.new_samples
        new = [(t, samples[j] if j < len(samples) else None) for j, t in enumerate(out.new_token_ids)]
        if not new and (out.finished or not out.prompt_samples):
            new = [(-1, None)]
        for j, (token, sample) in enumerate(new):
            last = j == len(new) - 1
            _add_row(record, out, token, sample, out.finish_reason if last else FinishReason.NONE,
                     out.num_output_tokens - (len(new) - 1 - j) if token >= 0 else out.num_output_tokens)
    return record


def _add_row(record: StepTokens, out: RequestOutput, token: int, sample: SampleResult | None,
             finish_reason: FinishReason, num_output_tokens: int, in_prompt: bool = False) -> None:
    record.rids.append(out.rid)
    record.token_ids.append(token)
    record.finish_reasons.append(finish_reason)
    record.num_prompt_tokens.append(out.num_prompt_tokens)
    record.num_cached_tokens.append(out.num_cached_tokens)
    record.num_output_tokens.append(num_output_tokens)
    has_logprob = sample is not None and sample.logprob is not None
    record.logprobs.append(sample.logprob if has_logprob else math.nan)
    record.top_counts.append(len(sample.top_ids) if has_logprob else 0)
    if has_logprob:
        record.top_ids += sample.top_ids
        record.top_logprobs += sample.top_logprobs
    record.in_prompt.append(in_prompt)
    record.ranks.append(sample.rank if sample is not None else 0)


class GrammarCompiles:
    """Requests whose grammars compile on one worker thread (llguidance releases the GIL meanwhile); `done()`
    hands back those finished, in arrival order, with their matcher or the error that refuses them."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None   # started at the first grammar
        self._pending: dict[int, tuple[TokenizedRequest, Future]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def submit(self, req: TokenizedRequest, compile_grammar: Callable[[str], RequestGrammar]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._pending[req.rid] = (req, self._pool.submit(compile_grammar, req.params.grammar))

    def cancel(self, rid: int) -> bool:
        """Forget a request aborted while its grammar compiles; False if it is not here."""
        return self._pending.pop(rid, None) is not None

    def done(self) -> list[tuple[TokenizedRequest, RequestGrammar | None, ValueError | None]]:
        finished = []
        for rid, (req, future) in list(self._pending.items()):
            if not future.done():
                break   # one thread compiles in order: the rest are not done either
            del self._pending[rid]
            error = future.exception()
            if error is not None and not isinstance(error, ValueError):
                raise error
            finished.append((req, None if error else future.result(), error))
        return finished

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


class SchedulerLoop:
    def __init__(self, channels: SchedulerChannels, watch: ParentWatch) -> None:
        self.from_tokenizers = [spec.open() for spec in channels.from_tokenizers]
        self.from_detokenizer = channels.from_detokenizer.open()
        self.to_detokenizer = channels.to_detokenizer.open()
        self.to_other_ranks = channels.to_other_ranks.open() if channels.to_other_ranks is not None else None
        self.inputs = [*self.from_tokenizers, self.from_detokenizer]
        self.watch = watch
        self.engine: LLMEngine | None = None    # (or anything with its interface) set before run()
        self.status: StatusBlock | None = None  # where the stats go, set before run()
        self.replica = 0                        # which replica's stats slot (--dp-size)
        self.compiles = GrammarCompiles()

    def run(self) -> None:
        """Step the engine until a SHUTDOWN record arrives or the parent goes away."""
        engine = self.engine
        published = None
        while True:
            outputs: list[RequestOutput] = []
            if not self.poll_inputs(outputs):
                return
            if self.compiles:
                for req, grammar, error in self.compiles.done():
                    if error is None:
                        self.add(req, grammar)
                    else:
                        self.refuse(req, error)
            stepped = engine.has_unfinished()
            if stepped:
                outputs += engine.step()
            # Stats first: a client that sees its request finish then sees its pages freed in /metrics.
            stats = engine.stats()
            if stats != published or stepped:   # a step's histograms change even where its stats do not
                self.status.publish_stats(stats, engine.metrics(), self.replica)
                published = stats
            failed = [out for out in outputs if out.error]
            if failed:   # their clients get the error, not this step's tokens
                outputs = [out for out in outputs if not out.error]
            if outputs:
                record = step_tokens(outputs)
                record.emitted_ns = time.monotonic_ns()
                self.to_detokenizer.send(record)
            for out in failed:
                self.to_detokenizer.send(Error(out.rid, 400, out.error))
            self.watch.check()
            if not engine.has_unfinished():
                wait_any(self.inputs, COMPILE_POLL_S if self.compiles else IDLE_WAIT_S)

    def poll_inputs(self, outputs: list[RequestOutput]) -> bool:
        """Apply every pending TOKENIZED_REQUEST, ABORT and FLUSH_CACHE; False once a SHUTDOWN arrived."""
        for channel in self.inputs:
            for record in channel.drain():
                if isinstance(record, TokenizedRequest):
                    if record.params.grammar is not None:
                        self.compiles.submit(record, self.engine.compile_grammar)
                    else:
                        self.add(record)
                elif isinstance(record, Abort):
                    if self.compiles.cancel(record.rid):
                        continue
                    out = self.engine.abort(record.rid)
                    if out is not None:
                        outputs.append(out)
                elif isinstance(record, FlushCache):
                    logger.info("prefix cache flushed: %d pages freed", self.engine.flush_prefix_cache())
                elif isinstance(record, Shutdown):
                    return False
                else:
                    logger.error("unexpected %s record on channel %s; ignored", record.KIND.name, channel.name)
        return True

    def add(self, req: TokenizedRequest, grammar: RequestGrammar | None = None) -> None:
        try:
            self.engine.add_request(req.rid, req.prompt_ids.tolist(), req.params, grammar,
                                    req.arrival_ns / 1e9 if req.arrival_ns else None, req.priority)
        except ValueError as exc:
            self.refuse(req, exc)

    def refuse(self, req: TokenizedRequest, error: ValueError) -> None:
        self.to_detokenizer.send(Error(req.rid, 400, _INTERNAL_RID.sub("", str(error))))

    def close(self) -> None:
        self.compiles.close()
        if isinstance(self.engine, TPLeader):
            self.engine.close()   # SHUTDOWN to the other ranks
        for channel in (*self.inputs, self.to_detokenizer):
            channel.close()


def load_engine(config: EngineConfig, source: ModelSource) -> LLMEngine:
    from minisrv.engine.llm_engine import LLMEngine   # torch and the model: only in this process

    return LLMEngine(config, source, load_tokenizer=partial(load_fast_tokenizer, source))


def main(info: WorkerInfo, config: EngineConfig, source: ModelSource, channels: SchedulerChannels,
         make_engine: Callable[[EngineConfig, ModelSource], LLMEngine] = load_engine,
         tp_group: TPGroup | None = None, replica: int = 0) -> None:
    """Entry point of the spawned scheduler. `make_engine` may build anything with LLMEngine's interface
    (and its `loaded` facts), e.g. a model-free engine to measure the pipeline alone. With `tp_group` this is
    rank 0 of a tensor-parallel group, its engine a TPLeader over the `to_other_ranks` channel (and gloo to
    other hosts' ranks). `replica` is its index among --dp-size replicas (its stats slot, its GPUs)."""

    def set_up(loop: SchedulerLoop, status: StatusBlock) -> None:
        if tp_group is not None:
            engine = TPLeader.of(load_rank_engine(config, source, tp_group), loop.to_other_ranks)
        else:
            if replica and config.resolved_device() == "cuda":
                from minisrv.layers.parallel import bind_gpu

                bind_gpu(replica)
            engine = make_engine(config, source)
        loop.replica = replica
        loaded = engine.loaded
        loop.engine, loop.status = engine, status
        status.publish_model(ModelFacts(loaded.name, loaded.max_model_len, loaded.model_config.vocab_size))
        logger.info("engine ready: %s, context length %d", loaded.name, loaded.max_model_len)

    serve_worker(info, lambda status, watch: SchedulerLoop(channels, watch), set_up)
