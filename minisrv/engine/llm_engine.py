"""The engine loop shared by the offline API and the scheduler process: schedule, execute, postprocess.

With overlap scheduling (on CUDA, unless disabled) a call schedules and launches step N+1 before it reads
step N's tokens, then records those: the CPU's scheduling, input building and ring reading happen while
the GPU computes, and the one wait per step is the read of the previous step's tokens. Step N+1 takes the
tokens it needs from the device (minisrv/engine/model_runner.py), so outputs are those of the plain loop;
only a request that step N stopped (EOS, a stop token) computes one row for nothing. A step N+1 whose batch
needs its requests' recorded tokens on the host (penalties, grammars) launches its forward, records step N
while the device runs it, and starts filling its grammar masks on a thread of their own (ModelRunner.fill_masks)
as soon as step N's tokens have advanced the grammars, the rest of the recording beside it (with grammar
processes, those take step N's tokens as they reach the host, from the launch on: engine/grammar_process.py); its
tokens are drawn when step N+2 is launched, after N+2's inputs are prepared on the host, or when they are collected
(ModelRunner.sample_deferred).
"""
from __future__ import annotations

import logging
import random
import time
from functools import partial
from typing import Callable

from minisrv.config import EngineConfig
from minisrv.engine.grammar import GrammarCompiler, RequestGrammar
from minisrv.engine.grammar_process import GrammarProcess, GrammarProcessGone, RemoteGrammar
from minisrv.engine.model_runner import LaunchedStep, ModelRunner
from minisrv.layers.parallel import TensorParallel
from minisrv.models.loader import LoadedModel, load_model
from minisrv.models.source import ModelSource
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch
from minisrv.scheduler.request import Request, RequestOutput, RequestTimes
from minisrv.scheduler.metrics import RequestMetrics
from minisrv.scheduler.scheduler import Scheduler
from minisrv.wire.terms import SchedulerStats

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None,
                 loaded: LoadedModel | None = None, overlap: bool | None = None,
                 tp: TensorParallel = TensorParallel(), load_tokenizer: Callable[[], object] | None = None) -> None:
        """`overlap` overrides the config's choice (overlap_schedule, on CUDA only: on the CPU the forward
        runs on the calling thread, so there is nothing to overlap and tokens would only come a step late).
        `load_tokenizer` gives the model's `tokenizers` Tokenizer, which structured output compiles grammars
        against (without it, a request with a grammar is refused).
        Under tensor parallelism every rank runs an engine of its own, fed the same requests, aborts and steps
        in the same order: their schedulers then decide alike (minisrv/runtime/tensor_parallel.py)."""
        self.config = config
        self.loaded = loaded if loaded is not None else load_model(config, source, tp)
        self.runner = ModelRunner(config, self.loaded)
        self.scheduler = Scheduler(
            config,
            num_pages=self.runner.num_pages,
            eos_token_ids=self.loaded.eos_token_ids,
            max_model_len=self.loaded.max_model_len,
            vocab_size=self.loaded.model_config.vocab_size,
            max_prefill_tokens=config.resolved_max_prefill_tokens(),
        )
        # Unseeded requests still get a concrete seed, so every draw is a function of (seed, position).
        self._seed_source = random.Random(config.seed)
        self.overlap = (config.overlap_schedule and self.runner.device.type == "cuda") if overlap is None else overlap
        # A drafted step's next one depends on how many drafts held, which only its results tell: no overlap (drafts
        # run on the CPU engine only, whose default is none).
        speculative = config.speculative is not None
        if self.overlap and speculative:
            raise ValueError("speculative decoding (--speculative-config) runs without overlap scheduling")
        if speculative:
            spec = config.speculative
            logger.info("speculative decoding (--speculative-config): up to %d drafted tokens from %d- to %d-grams of "
                        "each request's tokens; overlap scheduling off", spec.num_speculative_tokens,
                        spec.prompt_lookup_min, spec.prompt_lookup_max)
        self._in_flight: LaunchedStep | None = None
        self.grammars = GrammarCompiler(load_tokenizer or _no_tokenizer, self.loaded.model_config.vocab_size,
                                        self.loaded.eos_token_ids)
        if load_tokenizer is not None and _grammar_process_wanted(config, self.runner.device.type, tp):
            # Started with the engine (a second or two), not at the first grammar, which would hold up running streams.
            try:
                self.runner.attach_grammar_process(GrammarProcess(
                    self.grammars.tokenizer_json(), self.loaded.model_config.vocab_size, self.loaded.eos_token_ids,
                    max_rows=self.runner.last_tokens.shape[0], device=self.runner.device))
            except GrammarProcessGone as exc:
                logger.warning("grammar_process (--grammar-process): %s; the grammars stay in the engine's process",
                               exc)
        self.last_batch: ScheduledBatch | None = None   # what the last step scheduled (tensor-parallel ranks compare it)

    def add_request(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                    grammar: RequestGrammar | None = None, arrival: float | None = None, priority: int = 0) -> None:
        """Queue a request; raises ValueError (with a message fit for a client) when it is invalid. A request
        with params.grammar has it compiled here, unless the caller compiled it already (compile_grammar).
        `arrival`: when it reached the server (time.monotonic()), for the latency metrics; default now.
        `priority`: under --scheduling-policy priority, lower values run first."""
        if params.grammar is not None and grammar is None:
            grammar = self.compile_grammar(params.grammar)
        seed = params.seed if params.seed is not None else self._seed_source.getrandbits(63)
        times = RequestTimes(time.monotonic() if arrival is None else arrival)
        request = Request(rid=rid, prompt_ids=list(prompt_ids), params=params, seed=seed, grammar=grammar,
                          times=times, priority=priority)
        self.scheduler.add_request(request)
        if isinstance(grammar, RemoteGrammar):
            self.runner.grammar_process.register(request)   # compiled there while the prompt is computed

    def compile_grammar(self, grammar: str) -> RequestGrammar | RemoteGrammar:
        """A request's matcher for `grammar` (ValueError if it cannot be used); safe to call from another thread.
        With a grammar process, the grammar is only checked here: the process keeps the matcher."""
        if self.runner.grammar_process is not None:
            self.grammars.validate(grammar)
            return RemoteGrammar()
        return self.grammars.compile(grammar)

    def abort(self, rid: int) -> RequestOutput | None:
        return self.scheduler.abort(rid)

    def flush_prefix_cache(self) -> int:
        return self.scheduler.flush_prefix_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """One engine step; returns what it learnt (under overlap: the previous step's tokens)."""
        batch = self.last_batch = self.scheduler.schedule()
        if not self.overlap:
            results = self.runner.execute(batch) if batch else []
            return self.scheduler.postprocess(batch, results)
        outputs: list[RequestOutput] = []
        previous, self._in_flight = self._in_flight, None
        # Grammars and penalties read a request's recorded tokens: such a step's forward is launched first and
        # its tokens drawn once the previous step's are recorded, the host's part overlapping the forward.
        defer = previous is not None and bool(batch) and _needs_recorded_tokens(batch, previous)
        launched = self.runner.launch(batch, previous, defer_sampling=defer) if batch else None
        if previous is not None:
            # The masks start filling as soon as the grammars have seen previous's tokens: beside the rest of
            # the recording, not after it.
            fill_masks = partial(self.runner.fill_masks, launched) if defer else None
            outputs = self.scheduler.postprocess(previous.batch, self.runner.collect(previous), fill_masks)
        self._in_flight = launched
        return outputs

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def metrics(self) -> RequestMetrics:
        return self.scheduler.metrics


def _needs_recorded_tokens(batch: ScheduledBatch, previous: LaunchedStep) -> bool:
    """Whether a request of `batch` with a token in flight from `previous` uses penalties or a grammar, which
    read its recorded tokens."""
    return any((seq.request.grammar is not None or seq.request.params.penalised)
               and seq.request.rid in previous.token_rows for seq in batch.seqs)


def _grammar_process_wanted(config: EngineConfig, device_type: str, tp: TensorParallel) -> bool:
    """EngineConfig.grammar_process resolved. auto: on a CUDA device, unless under tensor parallelism (every rank
    must learn of a grammar's completion at the same step, so they all keep the matchers in process) or in a
    daemon process (which multiprocessing lets have no children)."""
    import multiprocessing

    if config.grammar_process == "off" or (config.grammar_process == "auto" and device_type != "cuda"):
        return False
    if tp.size > 1:
        if config.grammar_process == "on":
            logger.warning("grammar_process (--grammar-process) on: not under tensor parallelism; the grammars stay "
                           "in the engine's process")
        return False
    if multiprocessing.current_process().daemon:
        logger.warning("grammar_process (--grammar-process) %s: this is a daemon process, which cannot start one; "
                       "the grammars stay in the engine's process", config.grammar_process)
        return False
    return True


def _no_tokenizer() -> object:
    raise ValueError("grammar: this engine was built without the model's tokenizer, so it cannot constrain output")
