"""A live `minisrv serve` (embedded model) that tests may kill, stop and starve: its workers' pids, and checks
that it exits within 5 s leaving no process and nothing in /dev/shm."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.server.live_server import STARTUP_TIMEOUT_S, free_port

EXIT_WITHIN_S = 5.0
WORKERS = ("scheduler", "scheduler-1", "detokenizer", "tokenizer-0", "tokenizer-1", "api-server-1")


class Server:
    def __init__(self, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "minisrv.cli", "serve", "--port", str(self.port), "--max-model-len", "1024", *args],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.statuses = self._wait_healthy()
        self.workers = {name: int(pid) for name, pid in re.findall(r"(\S+) \(pid (\d+)\)", self.log())
                        if name in WORKERS}
        self.descendants = set(self.workers.values()) | _children(self.process.pid)

    def _wait_healthy(self) -> list[int]:
        statuses, deadline = [], time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"minisrv serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                statuses.append(httpx.get(f"{self.url}/health", timeout=2).status_code)
                if statuses[-1] == 200:
                    return statuses
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        self.process.kill()
        raise RuntimeError(f"minisrv serve did not become healthy:\n{self.log()}")

    def log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def wait_exit(self) -> int:
        try:
            return self.process.wait(EXIT_WITHIN_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            pytest.fail(f"minisrv serve did not exit within {EXIT_WITHIN_S} s:\n{self.log()}")

    def assert_nothing_left(self, within: float = 1.0) -> None:
        deadline = time.monotonic() + within
        while (living := [p for p in self.descendants if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert living == [], f"processes left behind: {living}\n{self.log()}"
        ours = [n for n in os.listdir("/dev/shm") if n.removeprefix("sem.").startswith(f"minisrv-{self.process.pid}-")]
        assert ours == [], f"left in /dev/shm: {ours}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.descendants:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


@pytest.fixture
def server(request: pytest.FixtureRequest):
    started = Server(*getattr(request, "param", ()))
    yield started
    started.close()


LONG_REQUEST = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "temperature": 0}


def post_in_background(server: Server) -> tuple[threading.Thread, dict[str, object]]:
    """LONG_REQUEST without streaming, from a thread; whole["response"] is its response or transport error."""
    whole: dict[str, object] = {}

    def post_whole() -> None:
        try:
            whole["response"] = httpx.post(f"{server.url}/v1/completions", json=LONG_REQUEST, timeout=60)
        except httpx.HTTPError as exc:
            whole["response"] = exc

    thread = threading.Thread(target=post_whole)
    thread.start()
    return thread, whole


def first_events(lines: Iterator[str], count: int) -> list[dict]:
    """The first `count` data events of an SSE stream (the rest stay unread in `lines`)."""
    events = []
    for line in lines:
        if line.startswith("data: {"):
            events.append(json.loads(line[6:]))
            if len(events) == count:
                break
    return events


def metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}(?:{{model_name=\"[^\"]*\"}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def streams_on_every_api_server(server: Server, stack: ExitStack, count: int = 2) -> dict[int, Iterator[str]]:
    """Streams of LONG_REQUEST, one per API server process (`count` of them), each past its first 3 events:
    pid -> the rest of its lines. Connections are opened one at a time until every process has one, since the
    kernel spreads them over the processes' sockets by address hash; the others are closed."""
    pids = {server.process.pid, *(pid for name, pid in server.workers.items() if name.startswith("api-server-"))}
    assert len(pids) == count, server.workers
    streams: dict[int, Iterator[str]] = {}
    for _ in range(64):
        with ExitStack() as attempt:
            response = attempt.enter_context(httpx.stream(
                "POST", f"{server.url}/v1/completions", json={**LONG_REQUEST, "stream": True}, timeout=30))
            assert response.status_code == 200
            client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
            owner = _socket_owner(server.port, client_port, pids)
            if owner in streams:
                continue
            lines = response.iter_lines()
            first_events(lines, 3)
            stack.push(attempt.pop_all())
            streams[owner] = lines
        if len(streams) == count:
            return streams
    pytest.fail(f"64 connections reached only the API server processes {sorted(streams)} of {sorted(pids)}")


def _socket_owner(server_port: int, client_port: int, pids: set[int]) -> int:
    """Which of `pids` holds the server's end of the TCP connection from `client_port` (from /proc/net/tcp)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (int(fields[1].rsplit(":", 1)[1], 16), int(fields[2].rsplit(":", 1)[1], 16)) == (server_port, client_port):
            inode = fields[9]
    assert inode is not None, f"no server-side socket for client port {client_port}"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if os.readlink(fd) == f"socket:[{inode}]":
                    return pid
            except OSError:   # closed meanwhile
                continue
    raise AssertionError(f"none of {pids} holds the connection from port {client_port}")
