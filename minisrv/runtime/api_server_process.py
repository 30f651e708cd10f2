"""An API server process beyond the first: `--api-server-count N` starts N - 1 of these.

One Python process streams about 30k tokens/s (bench/pipeline.py); past that, HTTP must spread over several.
Each API server process serves the connections the kernel hands its socket (minisrv/server/app.py's
listen_sockets), through an EngineClient of its own over its own tokenizer workers and its own text channel:
it numbers its requests in a residue class of its own (minisrv/wire/terms.py), so the detokenizer sends it
exactly their rows. The first API server is the launcher's process (minisrv/runtime/launch.py), which watches
every worker, these included; one of these only serves, and stops when the launcher says so through its
control pipe:
- an empty message (the server was asked to stop): streams in flight end with finish_reason "abort";
- a reason (something broke): streams in flight end with that error (an SSE error event, or a 503);
then HTTP closes (open responses get SHUTDOWN_GRACE_S) and it exits 0. The pipe's end (EOF) means the launcher
is gone. A worker it depends on dying shows here as the text channel closing, which ends the streams the same way.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection

from minisrv.config import ServerConfig
from minisrv.ipc import RingError
from minisrv.models.source import ModelSource, request_defaults
from minisrv.runtime.channels import ChannelSpec
from minisrv.runtime.engine_client import EngineClient
from minisrv.runtime.launch import GOING_DOWN, finish_http, late_heartbeat, start_http
from minisrv.runtime.status_block import StatusBlock
from minisrv.runtime.worker import (PARENT_CHECK_INTERVAL_S, ParentGone, ParentWatch, WorkerInfo, exit_quickly,
                                    freeze_start_up_objects, start_worker)
from minisrv.server.app import build_app
from minisrv.server.engine_handle import RequestError
from minisrv.tokenizer.prompts import load_prompt_tokenizer
from minisrv.wire.records import Shutdown

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiServerChannels:
    to_tokenizers: tuple[ChannelSpec, ...]   # PROMPT_REQUEST, ABORT, FLUSH_CACHE, SHUTDOWN (its own tokenizers)
    from_detokenizer: ChannelSpec            # TEXT_DELTAS, ERROR of the requests it numbered


@dataclass(frozen=True)
class ApiServerRole:
    """Which API server process this is, and what it needs to know of the others."""

    index: int                       # 1 .. count - 1 (0 is the launcher's process)
    count: int                       # API server processes in all
    listener: socket.socket          # its SO_REUSEPORT socket, bound by the launcher
    control: Connection              # the launcher's messages (see the module docstring)
    worker_names: tuple[str, ...]    # every worker, in status-block slot order (for /health's messages)


class ApiServer:
    """The event loop of one extra API server process: HTTP, its EngineClient, readiness and heartbeats."""

    def __init__(self, config: ServerConfig, source: ModelSource, role: ApiServerRole, client: EngineClient,
                 status: StatusBlock, watch: ParentWatch) -> None:
        self.config, self.source, self.role = config, source, role
        self.client, self.status, self.watch = client, status, watch
        self.shutdown = asyncio.Event()
        self.graceful = True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.role.control.fileno(), self.on_control)
        self.client.start(on_failure=lambda reason: self.end(f"{reason}; {GOING_DOWN}"))
        load_tokenizer = partial(load_prompt_tokenizer, self.source, self.config.chat_template)
        app = build_app(self.client, self.config, load_tokenizer, request_defaults(self.config, self.source))
        http = start_http(app, self.config, self.shutdown, self.role.listener, self.on_http_done)
        beating = loop.create_task(self.beat())
        await self.shutdown.wait()
        beating.cancel()
        await finish_http(http)
        loop.remove_reader(self.role.control.fileno())
        await self.client.close()

    async def beat(self) -> None:
        """Heartbeats, and /health's 503 while a worker's heartbeat is late."""
        while True:
            try:
                self.watch.check()
            except ParentGone as exc:
                self.end(f"{exc}; {GOING_DOWN}")
                return
            late = late_heartbeat(self.status.heartbeat_ages(), self.role.worker_names, self.config.watchdog_timeout)
            self.client.unresponsive_worker = late and f"{late[1]} has sent no heartbeat for {late[0]:.0f} s"
            await asyncio.sleep(PARENT_CHECK_INTERVAL_S)

    def on_control(self) -> None:
        try:
            message = self.role.control.recv_bytes().decode()
        except (EOFError, OSError):
            message = f"the launcher process is gone; {GOING_DOWN}"
        asyncio.get_running_loop().remove_reader(self.role.control.fileno())
        self.end(message)

    def end(self, error: str) -> None:
        """Stop taking requests and end those in flight: with finish_reason "abort" when `error` is empty."""
        if self.shutdown.is_set():
            return
        self.graceful = not error
        if error:
            logger.info("ending every stream: %s", error)
        self.client.end_streams(RequestError(503, error) if error else None)
        self.shutdown.set()

    def on_http_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("the HTTP server failed: %s", task.exception())
            self.end(f"API server {self.role.index}'s HTTP server failed; {GOING_DOWN}")


def main(info: WorkerInfo, config: ServerConfig, source: ModelSource, channels: ApiServerChannels,
         role: ApiServerRole) -> None:
    """Entry point of a spawned API server process."""
    import uvloop

    status, watch = start_worker(info)
    to_tokenizers = [spec.open() for spec in channels.to_tokenizers]
    from_detokenizer = channels.from_detokenizer.open_async()
    server = None
    try:
        client = EngineClient(to_tokenizers, from_detokenizer, status, config.reported_model_name,
                              api_server=role.index, api_server_count=role.count)
        server = ApiServer(config, source, role, client, status, watch)
        freeze_start_up_objects()
        status.mark_ready(info.slot, os.getpid())   # attached: the launcher may unlink the names
        uvloop.run(server.run())
    finally:
        if server is not None and server.graceful:   # as the launcher's own stop: SHUTDOWN through the tokenizers
            for channel in to_tokenizers:
                try:
                    channel.try_send(Shutdown())
                except RingError:   # that tokenizer has left already
                    pass
        for channel in (*to_tokenizers, from_detokenizer):
            channel.close()
        role.listener.close()
        status.close()
    exit_quickly()
