"""The worker processes of one server instance: their rings, spawning them, and stopping them.

    api ──req{i}──► tokenizer-i ──gen{i}──► scheduler ──tokens──► detokenizer ──text──► api
                         └───────dreq{i}──────────────────────────►    │
                                                scheduler ◄──stops─────┘

`req{i}` wakes its tokenizer through a semaphore (its only input); every ring into the scheduler, the
detokenizer or the API server's event loop wakes through a FIFO, since those wait on several rings
at once (select) or inside the loop. Capacities bound the largest record: half the ring.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from typing import Callable

from minisrv.config import EngineConfig, ServerConfig
from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.ipc.aio import AsyncRingReader
from minisrv.ipc.records import Shutdown
from minisrv.scheduler import process as scheduler_process
from minisrv.status_block import StatusBlock
from minisrv.tokenizer import detokenizer, worker as tokenizer_worker
from minisrv.worker_process import WorkerInfo

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class RingCapacities:
    """Bytes per ring (powers of two); a record may use half. Shared memory is touched only as used."""

    requests: int = 8 * MiB       # api -> tokenizer: prompt text or ids, chat messages
    generate: int = 4 * MiB       # tokenizer -> scheduler: prompt ids
    detok_requests: int = 4 * MiB  # tokenizer -> detokenizer: prompt ids for echo
    tokens: int = 4 * MiB         # scheduler -> detokenizer: one step's rows
    # detokenizer -> scheduler: aborts. The only ring against the flow (scheduler -> detokenizer), so the
    # two could wait on each other only if this one filled: it holds ~10k aborts, far more than running requests.
    stops: int = 256 * 1024
    text: int = 8 * MiB           # detokenizer -> api: one batch's text (echo can be a whole prompt)


def tokenizer_source(config: EngineConfig) -> EngineConfig:
    """The config the tokenizer workers and the detokenizer load from. The embedded model is fetched and
    converted here, once, rather than by several workers at the same time; they then read its directory
    (the scheduler keeps "embedded", whose name the server reports)."""
    if config.model != "embedded" or config.load_format == "dummy":
        return config
    from minisrv.models.embedded import embedded_model_dir

    return replace(config, model=str(embedded_model_dir()))


@dataclass
class Worker:
    name: str
    process: BaseProcess


class Pipeline:
    """Creates every ring and the status block in the API server process, then spawns the workers."""

    def __init__(self, config: ServerConfig, capacities: RingCapacities = RingCapacities(),
                 make_engine: Callable[[EngineConfig], object] = scheduler_process.load_engine) -> None:
        self.config = config
        self.make_engine = make_engine   # picklable (a module-level function): it travels to the scheduler
        self.rings = RingSet()
        num_tok = config.num_tokenizers
        self.status = StatusBlock.create(f"{self.rings.prefix}-status", num_workers=num_tok + 2)
        try:
            requests = [self.rings.create(f"req{i}", capacities.requests) for i in range(num_tok)]
            generate = [self.rings.create(f"gen{i}", capacities.generate, wakeup=Wakeup.FIFO) for i in range(num_tok)]
            detok_requests = [self.rings.create(f"dreq{i}", capacities.detok_requests, wakeup=Wakeup.FIFO)
                              for i in range(num_tok)]
            tokens = self.rings.create("tokens", capacities.tokens, wakeup=Wakeup.FIFO)
            stops = self.rings.create("stops", capacities.stops, wakeup=Wakeup.FIFO)
            text = self.rings.create("text", capacities.text, wakeup=Wakeup.FIFO)
            self._targets = [
                ("scheduler", scheduler_process.main, scheduler_process.SchedulerRings(
                    tuple(r.reader for r in generate), stops.reader, tokens.producer)),
                ("detokenizer", detokenizer.main, detokenizer.DetokenizerRings(
                    tuple(r.reader for r in detok_requests), tokens.reader, text.producer, stops.producer)),
            ] + [(f"tokenizer-{i}", tokenizer_worker.main, tokenizer_worker.TokenizerRings(
                requests[i].reader, generate[i].producer, detok_requests[i].producer)) for i in range(num_tok)]
            # The API server's own ends.
            self.to_tokenizers = [RingWriter(r.producer) for r in requests]
            self.from_detokenizer = AsyncRingReader(RingReader(text.reader))
        except BaseException:
            self.unlink()
            raise
        self.workers: list[Worker] = []

    def start(self) -> None:
        """Spawn every worker (a fresh interpreter each: no inherited locks, threads or CUDA state)."""
        spawn = multiprocessing.get_context("spawn")
        level = self.config.log_level
        engine_config, tokenizer_config = self.config.engine, tokenizer_source(self.config.engine)
        for slot, (name, target, rings) in enumerate(self._targets):
            info = WorkerInfo(name, slot, os.getpid(), self.status.spec, level)
            if name == "scheduler":
                args = (info, engine_config, rings, self.make_engine)
            else:
                args = (info, tokenizer_config, rings)
            process = spawn.Process(target=target, args=args, name=f"minisrv-{name}")
            process.start()
            self.workers.append(Worker(name, process))

    def all_ready(self) -> bool:
        return all(self.status.ready_slots())

    def unlink(self) -> None:
        """Remove every shared-memory name (attached processes keep their mappings). Idempotent."""
        self.rings.unlink()
        self.status.unlink()

    def stop(self, graceful: bool, timeout: float) -> None:
        """Graceful: SHUTDOWN through the tokenizers (each forwards it downstream), then wait. Whatever
        is still running after `timeout` seconds, or at once when not graceful, is killed."""
        if graceful:
            for ring in self.to_tokenizers:
                if not ring.try_write(Shutdown().encode()):
                    graceful = False   # a stuck tokenizer: no point waiting for the others
        if graceful:
            deadline = time.monotonic() + timeout
            for worker in self.workers:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            if worker.process.is_alive():
                if graceful:
                    logger.warning("worker %s did not exit within %.1f s; killing it", worker.name, timeout)
                worker.process.kill()
        for worker in self.workers:
            worker.process.join(1.0)
        self.unlink()

    def close(self) -> None:
        """Close the API server's ring ends and status block (after stop(), on the event loop)."""
        for ring in self.to_tokenizers:
            ring.close()
        self.from_detokenizer.close()
        self.status.close()
