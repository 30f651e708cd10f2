"""`minisrv serve`: start the worker pipeline, serve HTTP on uvloop, watch the workers, shut down cleanly.

The API server is this (parent) process; with --api-server-count N, N - 1 more serve the same port as workers
(minisrv/runtime/api_server_process.py), which this one tells when to stop. It serves HTTP at once (so /health
can say 503 while the model loads), reports ready once every worker has, and stops:
- on SIGINT/SIGTERM: in-flight streams end with finish_reason "abort", workers get SHUTDOWN, exit 0;
- when a worker dies: in-flight requests end with an error (an SSE error event, or a 503), a message
  naming the worker, the other workers are killed, exit 1; the same when a worker sends no heartbeat for
  --watchdog-timeout seconds (stopped, or stuck), and /health answers 503 while a heartbeat is late.
The rings' and the status block's names are unlinked as soon as every process has attached, so no
way of exiting (`kill -9` included) leaves anything in /dev/shm.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Callable

from minisrv.config import ServerConfig
from minisrv.server.engine_handle import RequestError

if TYPE_CHECKING:
    from starlette.applications import Starlette

    from minisrv.models.source import ModelSource
    from minisrv.runtime.pipeline import Pipeline, WorkerProcess

logger = logging.getLogger("minisrv")

READY_POLL_S = 0.02
HTTP_SHUTDOWN_S = 2.5     # in-flight responses get this long to send their last chunk
WORKER_EXIT_S = 1.5       # then the workers this long to leave on their own: all is over within 5 s
WATCHDOG_POLL_S = 0.5     # how often the heartbeats are read
HEALTH_LATE_MAX_S = 10.0  # a heartbeat this late (or half --watchdog-timeout) makes /health 503
CULPRIT_WAIT_S = 1.0      # after a failure, how long to wait for the worker that caused it to be reaped
GOING_DOWN = "the server is going down"   # ends every failure's message to clients


def check_config(config: ServerConfig) -> None:
    """Refuse what cannot run before starting anything; messages name the flag."""
    engine = config.engine
    needed = engine.dp_size * engine.ranks_per_node
    if needed > 1 and engine.resolved_device() == "cuda":
        import torch

        found = torch.cuda.device_count()
        if found < needed:
            flags = f"--tp-size {engine.tp_size}" + (f" --dp-size {engine.dp_size}" if engine.dp_size > 1 else "")
            per_node = f" on each of --nnodes {engine.nnodes}" if engine.nnodes > 1 else ""
            raise ValueError(f"{flags}: needs {needed} CUDA devices{per_node}, found {found}")
    if config.ssl_certfile is not None:   # here, not in each API server process's hypercorn
        from minisrv.server.app import check_tls

        check_tls(config)


def serve(config: ServerConfig, command: str = "serve",
          supervisor: Callable[[ServerConfig, Pipeline], Supervisor] | None = None, serve_http: bool = True) -> int:
    """Run the server until a signal or a worker's death; the process exit code. `minisrv run-batch` runs the same
    workers under a supervisor of its own (minisrv/runtime/batch.py), without HTTP."""
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s {'api-server' if config.engine.node_rank == 0 else 'node'} "
                               "%(levelname)s %(message)s")
    try:
        check_config(config)
        from minisrv.models.source import generation_config_defaults, request_defaults, resolve_source
        from minisrv.tokenizer.loading import check_vocabulary

        # Once, here: the embedded model is fetched by this process, not by several workers at a time.
        source = resolve_source(config.engine)
        check_vocabulary(source)
        defaults = request_defaults(config, source)   # the API server processes read the same file again
    except ValueError as exc:
        print(f"minisrv {command}: error: {exc}", file=sys.stderr)
        return 2
    if defaults:
        origin = [name for name, given in (("--override-generation-config", config.override_generation_config),
                                           ("the model's generation_config.json",
                                            generation_config_defaults(config, source))) if given]
        logger.info("sampling options a request leaves out default to %s (%s)", defaults, " over ".join(origin))
    if config.engine.node_rank > 0:   # another host's tensor-parallel ranks: no HTTP, no tokenizers
        from minisrv.runtime.tensor_parallel import serve_node

        return serve_node(config.engine, source)
    import uvloop

    return uvloop.run(_serve(config, source, command, supervisor or Supervisor, serve_http))


async def _serve(config: ServerConfig, source: ModelSource, command: str,
                 supervisor: Callable[[ServerConfig, Pipeline], Supervisor], serve_http: bool) -> int:
    from minisrv.runtime.pipeline import Pipeline

    try:
        pipeline = Pipeline(config, source, serve_http=serve_http)
    except ValueError as exc:   # the address cannot be bound
        print(f"minisrv {command}: error: {exc}", file=sys.stderr)
        return 2
    return await serve_pipeline(config, pipeline, supervisor)


async def serve_pipeline(config: ServerConfig, pipeline: Pipeline,
                         supervisor: Callable[[ServerConfig, Pipeline], Supervisor] | None = None) -> int:
    """Serve HTTP over `pipeline` until a signal or a worker's death (bench/pipeline.py brings its own)."""
    try:
        return await (supervisor or Supervisor)(config, pipeline).run()
    finally:
        pipeline.unlink()   # idempotent; covers an exception before the workers were even started


def start_http(app: Starlette, config: ServerConfig, shutdown: asyncio.Event, listener: socket.socket,
               on_done: Callable[[asyncio.Task], None]) -> asyncio.Task:
    """Serve HTTP on `listener` until `shutdown` is set; `on_done` sees the task end (a failure, or the close)."""
    from minisrv.server.app import run_http

    http = asyncio.get_running_loop().create_task(run_http(app, config, shutdown, listener))
    http.add_done_callback(on_done)
    return http


async def finish_http(http: asyncio.Task) -> None:
    """After the shutdown event: open responses get HTTP_SHUTDOWN_S to send their last chunks."""
    try:
        await asyncio.wait_for(asyncio.shield(http), HTTP_SHUTDOWN_S)
    except (asyncio.TimeoutError, Exception):   # noqa: BLE001 - on_done reported a failure
        http.cancel()


def late_heartbeat(ages: list[float | None], names: list[str] | tuple[str, ...],
                   watchdog_timeout: float) -> tuple[float, str] | None:
    """(age, name) of the worker whose last heartbeat is oldest, if it is old enough for /health to say 503."""
    late_after = min(HEALTH_LATE_MAX_S, watchdog_timeout / 2)
    late = [(age, name) for age, name in zip(ages, names) if age is not None and age > late_after]
    return max(late, key=lambda item: item[0]) if late else None


class Supervisor:
    """The API server process's event loop: HTTP, the client over the rings, and watching the workers."""

    def __init__(self, config: ServerConfig, pipeline: Pipeline) -> None:
        from minisrv.runtime.engine_client import EngineClient

        self.config = config
        self.pipeline = pipeline
        self.client = EngineClient(pipeline.to_tokenizers, pipeline.from_detokenizer, pipeline.status,
                                   config.reported_model_name, api_server=0, api_server_count=pipeline.api_server_count)
        self.loop = asyncio.get_running_loop()
        self.shutdown = asyncio.Event()
        self.exit_code = 0
        self.stopping = False
        self._failing: asyncio.Task | None = None

    async def run(self) -> int:
        from minisrv.models.source import request_defaults
        from minisrv.server.app import build_app

        for sig in (signal.SIGINT, signal.SIGTERM):
            self.loop.add_signal_handler(sig, self.stop, f"received {signal.Signals(sig).name}", 0)
        try:
            self.pipeline.start()
            logger.info("workers: %s", ", ".join(f"{w.name} (pid {w.process.pid})" for w in self.pipeline.workers))
            for worker in self.pipeline.workers:
                self.loop.add_reader(worker.process.sentinel, self.on_worker_exit, worker)
            self.client.start(on_failure=self.fail)
            app = build_app(self.client, self.config, self.pipeline.prompt_tokenizer,
                            request_defaults(self.config, self.pipeline.source))
            await self.work(app)
        finally:
            self.stopping = True
            for worker in self.pipeline.workers:
                self.loop.remove_reader(worker.process.sentinel)
            self.pipeline.stop(graceful=self.exit_code == 0, timeout=WORKER_EXIT_S)
            await self.client.close()
            self.pipeline.close()
        return self.exit_code

    async def work(self, app: Starlette) -> None:
        """Serve HTTP until the shutdown event (a signal, a worker's death); the workers are starting."""
        http = start_http(app, self.config, self.shutdown, self.pipeline.listeners[0], self.on_http_done)
        started = time.monotonic()
        if await self.until_ready():
            logger.info("serving %s at %s (ready in %.1f s)", self.client.model_name, self.config.url,
                        time.monotonic() - started)
        watchdog = self.loop.create_task(self.watch_heartbeats())
        await self.shutdown.wait()
        watchdog.cancel()
        await finish_http(http)

    async def until_ready(self) -> bool:
        """Wait for every worker to be ready (True), or for the shutdown event (False)."""
        while not self.pipeline.all_ready():
            if self.shutdown.is_set():
                return False
            await asyncio.sleep(READY_POLL_S)
        self.pipeline.unlink()   # every process has attached by now (workers attach before loading anything)
        self.client.mark_ready(self.pipeline.status.model())
        return True

    async def watch_heartbeats(self) -> None:
        """/health says 503 while a worker's heartbeat is late; past --watchdog-timeout the server goes down."""
        timeout = self.config.watchdog_timeout
        pids = {w.name: w.process.pid for w in self.pipeline.workers}
        while not self.shutdown.is_set():
            late = late_heartbeat(self.pipeline.status.heartbeat_ages(), list(pids), timeout)
            if late is None:
                self.client.unresponsive_worker = None
            else:
                age, name = late
                silent = f"{name} (pid {pids[name]}) has sent no heartbeat for {age:.0f} s"
                self.client.unresponsive_worker = silent
                if age > timeout:
                    self.fail(f"worker {silent} (--watchdog-timeout {timeout:g})")
                    return
            await asyncio.sleep(WATCHDOG_POLL_S)

    def stop(self, reason: str, exit_code: int) -> None:
        """End every stream in flight (finish_reason "abort") and let the HTTP server close."""
        if self.stopping or (self._failing is not None and exit_code == 0):   # a failure outranks a signal
            return
        self.stopping = True
        self.exit_code = exit_code
        logger.log(logging.ERROR if exit_code else logging.INFO, "%s; shutting down", reason)
        self.client.end_streams()
        if self._failing is None:   # a failure told the other API server processes already
            self.pipeline.tell_api_servers("")
        self.shutdown.set()

    def fail(self, reason: str) -> None:
        """Something broke: stop serving now, then exit non-zero naming the worker that died."""
        if self.stopping or self._failing is not None:
            return
        message = f"{reason}; {GOING_DOWN}"
        self.client.end_streams(RequestError(503, message))
        self.pipeline.tell_api_servers(message)
        self._failing = self.loop.create_task(self._stop_naming_the_culprit(reason))

    async def _stop_naming_the_culprit(self, reason: str) -> None:
        # Neighbours notice a death through their rings and leave (exit code 0), sometimes before the
        # dead process can even be reaped (a killed process with gigabytes mapped takes a while to go):
        # wait a little for a worker that exited with an error, the better explanation.
        deadline = time.monotonic() + CULPRIT_WAIT_S
        while time.monotonic() < deadline and not any(w.process.exitcode for w in self.pipeline.workers):
            await asyncio.sleep(READY_POLL_S)
        exited = [w for w in self.pipeline.workers if w.process.exitcode is not None]
        if exited:
            culprit = min(exited, key=lambda w: w.process.exitcode == 0)
            self.client.worker_died(culprit.name)
            reason = (f"worker {culprit.name} (pid {culprit.process.pid}) died with exit code "
                      f"{culprit.process.exitcode}")
        self.stop(reason, 1)

    def on_worker_exit(self, worker: WorkerProcess) -> None:
        self.loop.remove_reader(worker.process.sentinel)
        if not self.stopping:
            self.fail(f"worker {worker.name} (pid {worker.process.pid}) exited")

    def on_http_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:   # e.g. the port is taken
            self.fail(f"the HTTP server failed: {task.exception()}")
