"""The worker processes of one server instance: their rings, spawning them, and stopping them.

    api ──req{i}──► tokenizer-i ──tok{i}──► scheduler ──tokens──► detokenizer ──text──► api
                         └───────detok{i}─────────────────────────►    │
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
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import Callable

from minisrv.config import EngineConfig, ServerConfig
from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.ipc.aio import AsyncRingReader
from minisrv.models.source import ModelSource
from minisrv.runtime import detokenizer_process, scheduler_process, tokenizer_process
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import WorkerInfo
from minisrv.wire.records import Shutdown

logger = logging.getLogger(__name__)

MiB = 1 << 20


@dataclass(frozen=True)
class RingCapacities:
    """Bytes per ring (powers of two); a record may use half. Shared memory is touched only as used."""

    requests: int = 8 * MiB       # api -> tokenizer: prompt text or ids, chat messages
    tokenized: int = 4 * MiB      # tokenizer -> scheduler: prompt ids
    detokenize: int = 4 * MiB     # tokenizer -> detokenizer: prompt ids for echo
    tokens: int = 4 * MiB         # scheduler -> detokenizer: one step's rows
    # detokenizer -> scheduler: aborts. The only ring against the flow (scheduler -> detokenizer), so the
    # two could wait on each other only if this one filled: it holds ~10k aborts, far more than running requests.
    stops: int = 256 * 1024
    text: int = 8 * MiB           # detokenizer -> api: one batch's text (echo can be a whole prompt)


@dataclass
class WorkerProcess:
    name: str
    process: BaseProcess


class Pipeline:
    """Creates every ring and the status block in the API server process, then spawns the workers.

    `source` is the model, resolved once by the launcher (so the embedded model is fetched by one process)."""

    def __init__(self, config: ServerConfig, source: ModelSource, capacities: RingCapacities = RingCapacities(),
                 make_engine: Callable[[EngineConfig, ModelSource], object] = scheduler_process.load_engine) -> None:
        self.config = config
        self.source = source
        self.make_engine = make_engine   # picklable (a module-level function): it travels to the scheduler
        self.rings = RingSet()
        num_tok = config.num_tokenizers
        self.status = StatusBlock.create(f"{self.rings.prefix}-status", num_workers=num_tok + 2)
        try:
            requests = [self.rings.create(f"req{i}", capacities.requests) for i in range(num_tok)]
            tokenized = [self.rings.create(f"tok{i}", capacities.tokenized, wakeup=Wakeup.FIFO) for i in range(num_tok)]
            detokenize = [self.rings.create(f"detok{i}", capacities.detokenize, wakeup=Wakeup.FIFO)
                          for i in range(num_tok)]
            tokens = self.rings.create("tokens", capacities.tokens, wakeup=Wakeup.FIFO)
            stops = self.rings.create("stops", capacities.stops, wakeup=Wakeup.FIFO)
            text = self.rings.create("text", capacities.text, wakeup=Wakeup.FIFO)
            self._rings = {
                "scheduler": scheduler_process.SchedulerRings(
                    tuple(r.reader for r in tokenized), stops.reader, tokens.producer),
                "detokenizer": detokenizer_process.DetokenizerRings(
                    tuple(r.reader for r in detokenize), tokens.reader, text.producer, stops.producer),
                **{f"tokenizer-{i}": tokenizer_process.TokenizerRings(
                    requests[i].reader, tokenized[i].producer, detokenize[i].producer) for i in range(num_tok)},
            }
            # The API server's own ends.
            self.to_tokenizers = [RingWriter(r.producer) for r in requests]
            self.from_detokenizer = AsyncRingReader(RingReader(text.reader))
        except BaseException:
            self.unlink()
            raise
        self.workers: list[WorkerProcess] = []

    def start(self) -> None:
        """Spawn every worker (a fresh interpreter each: no inherited locks, threads or CUDA state)."""
        config, source = self.config, self.source
        spawn = multiprocessing.get_context("spawn")
        for slot, (name, rings) in enumerate(self._rings.items()):
            info = WorkerInfo(name, slot, os.getpid(), self.status.spec, config.log_level)
            if name == "scheduler":
                target, args = scheduler_process.main, (info, config.engine, source, rings, self.make_engine)
            elif name == "detokenizer":
                target, args = detokenizer_process.main, (info, source, rings)
            else:
                target, args = tokenizer_process.main, (info, source, config.chat_template, rings)
            process = spawn.Process(target=target, args=args, name=f"minisrv-{name}")
            process.start()
            self.workers.append(WorkerProcess(name, process))

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
