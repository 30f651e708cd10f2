"""`minisrv run-batch -i requests.jsonl -o results.jsonl`: `vllm run-batch`'s offline batch runner.

The same workers as `minisrv serve` (tokenizers, schedulers, detokenizer) and the same routes, without HTTP:
each line of the file (OpenAI's batch format, minisrv/server/batch_file.py) is answered by the app in process,
up to IN_FLIGHT_PER_SEQ x --max-num-seqs x --dp-size at a time so the engine's batch stays full, and the answers
are written in the input's order as they come. A line the server refuses is answered with its error; the
command exits 0 once every line has its output line, 1 when the batch was cut short (a signal, a worker's
death; the requests in flight then end as a server's streams do, with finish_reason "abort", and the lines
not yet sent are answered 503 while HTTP_SHUTDOWN_S lasts), 2 for bad settings or files.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import sys
from collections import Counter
from typing import IO

from tqdm import tqdm

from minisrv.config import ServerConfig
from minisrv.runtime.launch import HTTP_SHUTDOWN_S, Supervisor, serve
from minisrv.runtime.pipeline import Pipeline
from minisrv.server.batch_file import BatchLineError, BatchRequest, OrderedWriter, call_app, output_line, parse_line

logger = logging.getLogger(__name__)

# Requests handed to the server per running-batch slot, as vLLM's runner: its queue never runs dry.
IN_FLIGHT_PER_SEQ = 2


def run_batch(config: ServerConfig, input_file: str, output_file: str) -> int:
    """Answer every request of `input_file` ("-": stdin) into `output_file` ("-": stdout); the exit code."""
    if config.engine.node_rank > 0:
        print("minisrv run-batch: error: runs on node 0; start the other nodes with `minisrv serve --node-rank N`",
              file=sys.stderr)
        return 2
    try:
        source = sys.stdin if input_file == "-" else open(input_file, encoding="utf-8")
    except OSError as exc:
        print(f"minisrv run-batch: error: input_file (--input-file): {exc.strerror}: {input_file!r}", file=sys.stderr)
        return 2
    try:
        out = sys.stdout if output_file == "-" else open(output_file, "w", encoding="utf-8")
    except OSError as exc:
        print(f"minisrv run-batch: error: output_file (--output-file): {exc.strerror}: {output_file!r}",
              file=sys.stderr)
        return 2
    with source, out:
        # One API server process, this one, which never listens: the other processes would only serve HTTP.
        config = dataclasses.replace(config, api_server_count=1)
        return serve(config, "run-batch", functools.partial(BatchSupervisor, lines=source, out=out),
                     serve_http=False)


class BatchSupervisor(Supervisor):
    """Supervisor's workers and watchdog, with the batch file instead of HTTP as the work."""

    def __init__(self, config: ServerConfig, pipeline: Pipeline, lines: IO[str], out: IO[str]) -> None:
        super().__init__(config, pipeline)
        self.lines, self.writer = lines, OrderedWriter(out)
        self.counts: Counter[str] = Counter()

    async def work(self, app) -> None:
        if not await self.until_ready():
            return
        logger.info("running the batch on %s", self.client.model_name)
        watchdog = self.loop.create_task(self.watch_heartbeats())
        batch, stopped = self.loop.create_task(self.answer_all(app)), self.loop.create_task(self.shutdown.wait())
        await asyncio.wait({batch, stopped}, return_when=asyncio.FIRST_COMPLETED)
        watchdog.cancel()
        stopped.cancel()
        if batch.done() and batch.exception() is None:
            self.stop(f"the batch is done ({self.summary()})", 0)
            return
        failure = batch.exception() if batch.done() else None
        if not batch.done():   # the requests in flight end now (as a server's streams do): write their answers
            await asyncio.wait({batch}, timeout=HTTP_SHUTDOWN_S)
            batch.cancel()
        self.stop(f"the batch failed: {failure}" if failure else "the batch was stopped", 1)
        self.exit_code = self.exit_code or 1   # a signal stops a server with 0; an unfinished batch is a failure
        logger.error("%d output lines written (%s)", self.writer.written, self.summary())

    def summary(self) -> str:
        return ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items())) or "no requests"

    async def answer_all(self, app) -> None:
        engine = self.config.engine
        slots = asyncio.Semaphore(IN_FLIGHT_PER_SEQ * engine.max_running_requests * engine.dp_size)
        headers = [(b"authorization", f"Bearer {self.config.api_key}".encode())] if self.config.api_key else []
        running: set[asyncio.Task] = set()
        with tqdm(desc="run-batch", unit="req", file=sys.stderr, mininterval=1.0) as bar:
            index = 0
            for number, line in enumerate(self.lines, 1):
                if not line.strip():
                    continue
                try:
                    request = parse_line(line, number)
                except BatchLineError as exc:
                    self.writer.put(index, output_line(exc.custom_id, None, None, error=str(exc)))
                    self.counts["not a request"] += 1
                    bar.update()
                else:
                    await slots.acquire()
                    task = self.loop.create_task(self.answer(app, request, index, headers, bar))
                    running.add(task)
                    task.add_done_callback(running.discard)
                    task.add_done_callback(lambda _: slots.release())
                index += 1
            await asyncio.gather(*running)

    async def answer(self, app, request: BatchRequest, index: int, headers: list, bar: tqdm) -> None:
        try:
            status, body = await call_app(app, request.url, json.dumps(request.body).encode(), headers)
        except Exception as exc:   # noqa: BLE001 - the app's own error handler answered 500 and re-raised
            logger.exception("run-batch: %s failed", request.custom_id)
            status, body = 500, {"error": {"message": f"internal error: {exc}", "type": "internal_server_error",
                                           "param": None, "code": None}}
        self.writer.put(index, output_line(request.custom_id, status, body))
        self.counts["answered 200" if status == 200 else f"refused {status}"] += 1
        bar.update()
