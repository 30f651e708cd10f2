"""The worker processes of one server instance: their rings, spawning them, and stopping them.

    api-a ──req{i}──► tokenizer-i ──tok{i}_{d}──► scheduler ──tokens{d}──► detokenizer ──text{a}──► api-a
                           └───────detok{i}───────────────────────────────►    │
                                                      scheduler ◄──stops{d}────┘
                                                      scheduler ──tp{d}──► scheduler-1 .. (this host's other
                                                                           tensor-parallel ranks)

One scheduler per data-parallel replica d (--dp-size; named scheduler-dp{d} when there are several), each
with its own rings to and from the others. API server process a (--api-server-count; 0 is this process, the
others are workers named api-server-{a}) feeds tokenizers i with i % count == a and reads text{a}.

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
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Callable

from minisrv.config import EngineConfig, ServerConfig
from minisrv.ipc import Wakeup, instance_prefix, sweep_dead_instances
from minisrv.models.source import ModelSource
from minisrv.runtime import (api_server_process, detokenizer_process, scheduler_process, tensor_parallel,
                             tokenizer_process)
from minisrv.runtime.channels import Channels, RingCapacities, RingChannels
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.tensor_parallel import TPGroup
from minisrv.runtime.worker import WorkerInfo
from minisrv.scheduler.routing import RoutingPolicy
from minisrv.server.app import listen_sockets
from minisrv.wire.records import Shutdown

if TYPE_CHECKING:
    from minisrv.tokenizer.prompts import PromptTokenizer

logger = logging.getLogger(__name__)

# Thread pools of the worker processes, set before any library starts its own. Each worker is one busy
# Python thread; OpenMP and tokenizer pools sized to every core would only preempt the other processes'
# threads (issue 9 measured a served token 10.7 -> 6.2 ms on the GPU machine with OMP_NUM_THREADS=1).
# The CPU engine sizes its own intra-op pool explicitly (EngineConfig.cpu_threads).
WORKER_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class WorkerProcess:
    name: str
    process: BaseProcess


class Pipeline:
    """Creates every channel and the status block in the API server process, then spawns the workers.

    `source` is the model, resolved once by the launcher (so the embedded model is fetched by one process).
    `channels` carry the records: shared-memory rings; bench/pipeline.py swaps in ZeroMQ to compare.
    The listening sockets are bound here too (unless not `serve_http`), first: a port in use is a ValueError before
    anything starts."""

    def __init__(self, config: ServerConfig, source: ModelSource, capacities: RingCapacities = RingCapacities(),
                 make_engine: Callable[[EngineConfig, ModelSource], object] = scheduler_process.load_engine,
                 channels: Channels | None = None, serve_http: bool = True) -> None:
        self.config = config
        self.source = source
        self.make_engine = make_engine   # picklable (a module-level function): it travels to the scheduler
        removed = sweep_dead_instances()   # left by a server killed while it started (see minisrv/ipc/lifecycle.py)
        if removed:
            logger.info("removed %d shared-memory names left by a server that was killed while it started",
                        len(removed))
        self.api_server_count = num_api = config.resolved_api_server_count()
        # One per API server process; none for `minisrv run-batch`, which answers through the app in process.
        self.listeners = listen_sockets(config, num_api) if serve_http else []
        self.channels = channels = channels or RingChannels()
        engine, num_tok = config.engine, config.resolved_num_tokenizers()
        replicas, local_ranks = range(engine.dp_size), engine.ranks_per_node
        self.status = StatusBlock.create(f"{instance_prefix()}-status",
                                         num_tok + 1 + len(replicas) * local_ranks + num_api - 1,
                                         num_replicas=len(replicas))
        # name -> (entry point, its arguments after WorkerInfo), in status-block slot order
        self._workers: dict[str, tuple[Callable, tuple]] = {}
        self.api_server_names = [f"api-server-{a}" for a in range(1, num_api)]   # the other API server processes
        self.api_controls: list[Connection] = []   # this process's ends of their control pipes
        try:
            fifo = Wakeup.FIFO
            requests = [channels.create(f"req{i}", capacities.requests) for i in range(num_tok)]
            tokenized = [[channels.create(f"tok{i}_{d}", capacities.tokenized, fifo) for d in replicas]
                         for i in range(num_tok)]
            detokenize = [channels.create(f"detok{i}", capacities.detokenize, fifo) for i in range(num_tok)]
            tokens = [channels.create(f"tokens{d}", capacities.tokens, fifo) for d in replicas]
            stops = [channels.create(f"stops{d}", capacities.stops, fifo) for d in replicas]
            text = [channels.create(f"text{a}", capacities.text, fifo) for a in range(num_api)]
            for d in replicas:
                name = "scheduler" if len(replicas) == 1 else f"scheduler-dp{d}"
                group = TPGroup.for_config(engine, first_gpu=d * local_ranks) if engine.tp_size > 1 else None
                ranks = channels.create(f"tp{d}", capacities.tp, num_readers=local_ranks - 1) if local_ranks > 1 else None
                scheduler = scheduler_process.SchedulerChannels(
                    tuple(tok[d].reader for tok in tokenized), stops[d].reader, tokens[d].producer,
                    ranks and ranks.producer)
                self._workers[name] = (scheduler_process.main, (engine, source, scheduler, make_engine, group, d))
                for rank, reader in enumerate(ranks.readers if ranks else (), 1):
                    self._workers[f"{name}-{rank}"] = (tensor_parallel.follower_main,
                                                       (engine, source, group.of_rank(rank), reader))
            self._workers["detokenizer"] = (detokenizer_process.main, (source, detokenizer_process.DetokenizerChannels(
                tuple(c.reader for c in detokenize), tuple(c.reader for c in tokens), tuple(c.producer for c in text),
                tuple(c.producer for c in stops)), config.stream_interval))
            policy = RoutingPolicy(page_size=engine.page_size)
            for i in range(num_tok):
                ends = tokenizer_process.TokenizerChannels(requests[i].reader, tuple(c.producer for c in tokenized[i]),
                                                           detokenize[i].producer)
                self._workers[f"tokenizer-{i}"] = (tokenizer_process.main, (source, config.chat_template, ends, policy))
            names = (*self._workers, *self.api_server_names)
            for a in range(1, num_api):
                control, self_end = multiprocessing.Pipe(duplex=False)
                self.api_controls.append(self_end)
                own_tokenizers = tuple(requests[i].producer for i in range(a, num_tok, num_api))
                ends = api_server_process.ApiServerChannels(own_tokenizers, text[a].reader)
                role = api_server_process.ApiServerRole(a, num_api, self.listeners[a], control, names)
                self._workers[f"api-server-{a}"] = (api_server_process.main, (config, source, ends, role))
            # This API server's own ends.
            self.to_tokenizers = [requests[i].producer.open() for i in range(0, num_tok, num_api)]
            self.from_detokenizer = text[0].reader.open_async()
        except BaseException:
            self.unlink()
            for sock in self.listeners:
                sock.close()
            raise
        self.workers: list[WorkerProcess] = []

    def start(self) -> None:
        """Spawn every worker (a fresh interpreter each: no inherited locks, threads or CUDA state)."""
        spawn = multiprocessing.get_context("spawn")
        for name, value in WORKER_THREAD_ENV.items():   # inherited by the spawned interpreters; a user's choice wins
            os.environ.setdefault(name, value)
        for slot, (name, (target, args)) in enumerate(self._workers.items()):
            info = WorkerInfo(name, slot, os.getpid(), self.status.spec, self.config.log_level)
            process = spawn.Process(target=target, args=(info, *args), name=f"minisrv-{name}")
            process.start()
            self.workers.append(WorkerProcess(name, process))

    def prompt_tokenizer(self) -> PromptTokenizer:
        """The tokenizer workers' PromptTokenizer, built here (for the API process's /tokenize)."""
        from minisrv.tokenizer.prompts import load_prompt_tokenizer

        return load_prompt_tokenizer(self.source, self.config.chat_template)

    def all_ready(self) -> bool:
        return all(self.status.ready_slots())

    def unlink(self) -> None:
        """Remove every shared-memory name (attached processes keep their mappings). Idempotent."""
        self.channels.unlink()
        self.status.unlink()

    def tell_api_servers(self, error: str) -> None:
        """Tell the other API server processes to stop: with `error` for their streams, or "" (abort them)."""
        for control in self.api_controls:
            try:
                control.send_bytes(error.encode())   # bytes: nothing pickled between processes
            except OSError:   # that process is gone already
                pass

    def stop(self, graceful: bool, timeout: float) -> None:
        """Graceful: SHUTDOWN through the tokenizers (each forwards it downstream), then wait. Whatever
        is still running after `timeout` seconds, or at once when not graceful, is killed. The other API
        server processes (told by tell_api_servers) get that long first to send their streams' last chunks."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            if worker.name in self.api_server_names:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        if graceful:
            for channel in self.to_tokenizers:
                if not channel.try_send(Shutdown()):
                    graceful = False   # a stuck tokenizer: no point waiting for the others
        if graceful:
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
        """Close the API server's channel ends, sockets and status block (after stop(), on the event loop)."""
        for channel in (*self.to_tokenizers, *self.listeners, *self.api_controls):
            channel.close()
        self.from_detokenizer.close()
        self.status.close()
