"""The scheduler process (TP rank 0): the engine loop between the tokenizer rings and the detokenizer.

Between steps it polls its input rings (GENERATE / ABORT from the tokenizer workers, ABORT from the
detokenizer for stop strings): shared-memory loads only, no system call when nothing is there. With
no work left it sleeps on the rings' doorbells. Each step's news goes out as one TOKENS record, and
the engine's gauges go to the status block for /metrics. A request the engine refuses (ValueError:
too long for the context, token ids outside the vocabulary...) comes back as an ERROR record.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from minisrv.config import EngineConfig
from minisrv.ipc import RingReader, RingSpec, RingWriter
from minisrv.ipc.records import Abort, Error, Generate, Kind, Tokens, peek_kind
from minisrv.ipc.wait_any import check_fifo_readers, wait_any
from minisrv.scheduler.request import FinishReason, RequestOutput
from minisrv.status_block import ModelFacts, SchedulerStats, StatusBlock
from minisrv.worker_process import IDLE_WAIT_S, ParentWatch, WorkerInfo, serve_worker

if TYPE_CHECKING:
    from minisrv.engine.llm_engine import LLMEngine

logger = logging.getLogger(__name__)

# The engine names requests by their internal id in its messages; the client never sees those ids.
_INTERNAL_RID = re.compile(r"^request \d+: ")


@dataclass(frozen=True)
class SchedulerRings:
    from_tokenizers: tuple[RingSpec, ...]   # GENERATE, ABORT, SHUTDOWN (one ring per tokenizer worker)
    from_detokenizer: RingSpec              # ABORT (stop strings)
    to_detokenizer: RingSpec                # TOKENS, ERROR


def tokens_record(outputs: list[RequestOutput]) -> Tokens:
    """One TOKENS record for a step: a row per new token, or one row with token -1 for a bare finish."""
    rids, token_ids, finish, prompt, cached, output = [], [], [], [], [], []
    logprobs, top_counts, top_ids, top_logprobs = [], [], [], []
    for out in outputs:
        samples = out.new_samples
        new = [(t, samples[j] if j < len(samples) else None) for j, t in enumerate(out.new_token_ids)] or [(-1, None)]
        for j, (token, sample) in enumerate(new):
            last = j == len(new) - 1
            rids.append(out.rid)
            token_ids.append(token)
            finish.append(out.finish_reason if last else FinishReason.NONE)
            prompt.append(out.num_prompt_tokens)
            cached.append(out.num_cached_tokens)
            output.append(out.num_output_tokens - (len(new) - 1 - j) if token >= 0 else out.num_output_tokens)
            has_logprob = sample is not None and sample.logprob is not None
            logprobs.append(sample.logprob if has_logprob else math.nan)
            top_counts.append(len(sample.top_ids) if has_logprob else 0)
            if has_logprob:
                top_ids += sample.top_ids
                top_logprobs += sample.top_logprobs
    return Tokens(rids, token_ids, finish, prompt, cached, output, logprobs, top_counts, top_ids, top_logprobs)


class SchedulerProcess:
    def __init__(self, rings: SchedulerRings, watch: ParentWatch) -> None:
        self.from_tokenizers = [RingReader(spec) for spec in rings.from_tokenizers]
        self.from_detokenizer = RingReader(rings.from_detokenizer)
        self.to_detokenizer = RingWriter(rings.to_detokenizer)
        self.inputs = [*self.from_tokenizers, self.from_detokenizer]
        check_fifo_readers(self.inputs)
        self.watch = watch
        self.engine: LLMEngine | None = None    # (or anything with its interface) set before run()
        self.status: StatusBlock | None = None  # where the stats go, set before run()

    def run(self) -> None:
        """Step the engine until a SHUTDOWN record arrives or the parent goes away."""
        engine = self.engine
        published = None
        while True:
            outputs: list[RequestOutput] = []
            if not self.poll_inputs(outputs):
                return
            if engine.has_unfinished():
                outputs += engine.step()
            # Stats first: a client that sees its request finish then sees its pages freed in /metrics.
            stats = engine.stats()
            snapshot = SchedulerStats(stats.num_running, stats.num_waiting, stats.kv_cache_usage,
                                      stats.prefix_cache_queries, stats.prefix_cache_hits)
            if snapshot != published:
                self.status.publish_stats(snapshot)
                published = snapshot
            if outputs:
                self.to_detokenizer.write(tokens_record(outputs).encode())
            self.watch.check()
            if not engine.has_unfinished():
                wait_any(self.inputs, IDLE_WAIT_S)

    def poll_inputs(self, outputs: list[RequestOutput]) -> bool:
        """Apply every pending GENERATE and ABORT; False once a SHUTDOWN arrived."""
        for ring in self.inputs:
            for record in ring.drain():
                kind = peek_kind(record)
                if kind is Kind.GENERATE:
                    self.add(Generate.decode(record))
                elif kind is Kind.ABORT:
                    out = self.engine.abort(Abort.decode(record).rid)
                    if out is not None:
                        outputs.append(out)
                elif kind is Kind.SHUTDOWN:
                    return False
                else:
                    logger.error("unexpected %s record on ring %s; ignored", kind.name, ring.name)
        return True

    def add(self, req: Generate) -> None:
        try:
            self.engine.add_request(req.rid, req.prompt_ids.tolist(), req.params)
        except ValueError as exc:
            message = _INTERNAL_RID.sub("", str(exc))
            self.to_detokenizer.write(Error(req.rid, 400, message).encode())

    def close(self) -> None:
        for ring in (*self.inputs, self.to_detokenizer):
            ring.close()


def load_engine(config: EngineConfig) -> LLMEngine:
    from minisrv.engine.llm_engine import LLMEngine   # torch and the model: only in this process

    return LLMEngine(config)


def main(info: WorkerInfo, config: EngineConfig, rings: SchedulerRings,
         make_engine: Callable[[EngineConfig], LLMEngine] = load_engine) -> None:
    """Entry point of the spawned scheduler (rank 0). `make_engine` may build anything with LLMEngine's
    interface (and its `loaded` facts), e.g. a model-free engine to measure the pipeline alone."""

    def set_up(process: SchedulerProcess, status: StatusBlock) -> None:
        engine = make_engine(config)
        loaded = engine.loaded
        process.engine, process.status = engine, status
        status.publish_model(ModelFacts(loaded.name, loaded.max_model_len, loaded.model_config.vocab_size))
        logger.info("engine ready: %s, context length %d", loaded.name, loaded.max_model_len)

    serve_worker(info, lambda status, watch: SchedulerProcess(rings, watch), set_up)
