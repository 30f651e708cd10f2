"""`minisrv serve`: start the worker pipeline, serve HTTP on uvloop, watch the workers, shut down cleanly.

The API server is this (parent) process. It serves HTTP at once (so /health can say 503 while the
model loads), reports ready once every worker has, and stops:
- on SIGINT/SIGTERM: in-flight streams end with finish_reason "abort", workers get SHUTDOWN, exit 0;
- when a worker dies: a message naming it, the other workers are killed, exit 1.
The rings' and the status block's names are unlinked as soon as every process has attached, so no
way of exiting (`kill -9` included) leaves anything in /dev/shm.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time

from minisrv.config import ServerConfig

logger = logging.getLogger("minisrv")

READY_POLL_S = 0.02
HTTP_SHUTDOWN_S = 2.5     # in-flight responses get this long to send their last chunk
WORKER_EXIT_S = 1.5       # then the workers this long to leave on their own: all is over within 5 s


def check_config(config: ServerConfig) -> None:
    """Refuse what cannot run before starting anything; messages name the flag."""
    engine = config.engine
    if engine.tp_size > 1:
        import torch

        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found < engine.tp_size:
            raise ValueError(f"--tp-size {engine.tp_size}: needs {engine.tp_size} CUDA devices, found {found} "
                             "(tensor parallelism is not built yet either: use --tp-size 1)")
        raise ValueError(f"--tp-size {engine.tp_size}: tensor parallelism is not built yet; use --tp-size 1")
    if config.num_tokenizers < 1:
        raise ValueError(f"--num-tokenizers must be >= 1, got {config.num_tokenizers}")


def serve(config: ServerConfig) -> int:
    """Run the server until a signal or a worker's death; the process exit code."""
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s api-server %(levelname)s %(message)s")
    try:
        check_config(config)
    except ValueError as exc:
        print(f"minisrv serve: error: {exc}", file=sys.stderr)
        return 2
    if config.engine.model == "embedded" and config.engine.load_format != "dummy":
        # Fetch and convert once here, rather than in several workers at the same time.
        from minisrv.models.embedded import embedded_model_dir

        embedded_model_dir()
    import uvloop

    return uvloop.run(_serve(config))


async def _serve(config: ServerConfig) -> int:
    from minisrv.pipeline import Pipeline
    from minisrv.server.app import build_app, run_http
    from minisrv.server.client import EngineClient

    loop = asyncio.get_running_loop()
    pipeline = Pipeline(config)
    client = EngineClient(pipeline.to_tokenizers, pipeline.from_detokenizer, pipeline.status,
                          config.served_model_name)
    shutdown = asyncio.Event()
    state = {"exit_code": 0, "stopping": False}

    def stop(reason: str, exit_code: int) -> None:
        if state["stopping"]:
            return
        state["stopping"] = True
        state["exit_code"] = exit_code
        logger.log(logging.ERROR if exit_code else logging.INFO, "%s; shutting down", reason)
        client.end_streams()
        shutdown.set()

    def on_worker_exit(name: str, sentinel: int, process) -> None:
        loop.remove_reader(sentinel)
        if state["stopping"]:
            return
        client.worker_died(name)
        stop(f"worker {name} (pid {process.pid}) died with exit code {process.exitcode}", 1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, f"received {signal.Signals(sig).name}", 0)
    try:
        pipeline.start()
        for worker in pipeline.workers:
            process = worker.process
            loop.add_reader(process.sentinel, on_worker_exit, worker.name, process.sentinel, process)
        client.start(on_failure=lambda reason: stop(reason, 1))
        http = loop.create_task(run_http(build_app(client, config), config, shutdown))

        def on_http_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:   # e.g. the port is taken
                stop(f"the HTTP server failed: {task.exception()}", 1)

        http.add_done_callback(on_http_done)
        await _until_ready(pipeline, client, shutdown, config)
        await shutdown.wait()
        try:
            await asyncio.wait_for(asyncio.shield(http), HTTP_SHUTDOWN_S)
        except (asyncio.TimeoutError, Exception):   # noqa: BLE001 - already reported by its callback
            http.cancel()
    finally:
        state["stopping"] = True
        for worker in pipeline.workers:
            loop.remove_reader(worker.process.sentinel)
        pipeline.stop(graceful=state["exit_code"] == 0, timeout=WORKER_EXIT_S)
        await client.close()
        pipeline.close()
    return state["exit_code"]


async def _until_ready(pipeline, client, shutdown: asyncio.Event, config: ServerConfig) -> None:
    started = time.monotonic()
    while not pipeline.all_ready():
        if shutdown.is_set():
            return
        await asyncio.sleep(READY_POLL_S)
    pipeline.unlink()   # every process has attached by now (workers attach before they load anything)
    client.mark_ready(pipeline.status.model())
    host = f"[{config.host}]" if ":" in config.host else config.host
    logger.info("serving %s at http://%s:%d (ready in %.1f s)", client.model_name, host, config.port,
                time.monotonic() - started)
