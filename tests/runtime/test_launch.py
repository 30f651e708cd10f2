"""Lifecycle of a live `minisrv serve` (embedded model): signals, dead workers, a killed parent.

Each test starts its own server, since each ends it. Checked every time: exit within 5 s, no process
of the server left, nothing of the server left in /dev/shm.
"""
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
from pathlib import Path

import httpx
import pytest

from tests.server.live_server import STARTUP_TIMEOUT_S, free_port

EXIT_WITHIN_S = 5.0
WORKERS = ("scheduler", "scheduler-1", "detokenizer", "tokenizer-0", "tokenizer-1")


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
        while (alive := [p for p in self.descendants if _alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == [], f"processes left behind: {alive}\n{self.log()}"
        ours = [n for n in os.listdir("/dev/shm") if n.removeprefix("sem.").startswith(f"minisrv-{self.process.pid}-")]
        assert ours == [], f"left in /dev/shm: {ours}"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.descendants:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def _children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
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


# The second server runs two tokenizer workers: the two requests take one each, and the scheduler and
# the detokenizer wait on two input rings each.
@pytest.mark.parametrize(("server", "sig"), [((), signal.SIGINT), (("--num-tokenizers", "2"), signal.SIGTERM)],
                         indirect=["server"])
def test_signal_ends_requests_with_abort_and_exits_cleanly(server: Server, sig: signal.Signals) -> None:
    assert 503 in server.statuses or server.statuses == [200]   # 503 while the model loads
    thread, whole = post_in_background(server)
    chunks, done = [], False
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG_REQUEST, "stream": True},
                      timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        chunks += first_events(lines, 3)   # both requests run once the stream has a few tokens
        running_both = time.monotonic() + 60
        while _metric(server, "minisrv:num_requests_running") < 2 and time.monotonic() < running_both:
            time.sleep(0.05)
        signalled = time.monotonic()
        server.process.send_signal(sig)
        for line in lines:
            done = done or line == "data: [DONE]"
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    assert server.wait_exit() == 0, server.log()
    assert time.monotonic() - signalled < EXIT_WITHIN_S
    assert done and chunks[-1]["choices"][0]["finish_reason"] == "abort", server.log()
    thread.join(5)
    assert isinstance(whole["response"], httpx.Response), whole
    assert whole["response"].status_code == 200
    assert whole["response"].json()["choices"][0]["finish_reason"] == "abort"
    assert f"received {sig.name}" in server.log()
    server.assert_nothing_left()


@pytest.mark.parametrize(("server", "victim"), [((), "scheduler"), ((), "detokenizer"), ((), "tokenizer-0"),
                                                 (("--tp-size", "2", "--device", "cpu"), "scheduler-1")],
                         indirect=["server"])
def test_a_dead_worker_takes_the_server_down_and_clients_see_an_error(server: Server, victim: str) -> None:
    """Requests in flight when a worker dies get an error, never a normal-looking result: the stream an error
    event then [DONE] (its status was already 200), the non-stream request a 503."""
    thread, whole = post_in_background(server)
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**LONG_REQUEST, "stream": True},
                      timeout=30) as response:
        lines = response.iter_lines()
        events = first_events(lines, 3)
        os.kill(server.workers[victim], signal.SIGKILL)
        killed = time.monotonic()
        events += [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    code = server.wait_exit()
    assert time.monotonic() - killed < EXIT_WITHIN_S
    assert code != 0
    assert re.search(rf"worker {victim} \(pid \d+\) (died|exited)", server.log()), server.log()
    assert "error" in events[-1] and "going down" in events[-1]["error"]["message"], events[-1]
    assert all(c.get("choices", [{}])[0].get("finish_reason") != "abort" for c in events)
    thread.join(10)
    response = whole["response"]
    assert not isinstance(response, httpx.Response) or response.status_code == 503, response.text
    server.assert_nothing_left()


@pytest.mark.parametrize("server", [("--watchdog-timeout", "6")], indirect=True)
@pytest.mark.parametrize("victim", ["scheduler", "detokenizer", "tokenizer-0"])
def test_a_stopped_worker_makes_health_503_then_the_watchdog_takes_the_server_down(server: Server, victim: str
                                                                                    ) -> None:
    assert httpx.get(f"{server.url}/health_generate", timeout=30).json() == {"status": "ok"}
    os.kill(server.workers[victim], signal.SIGSTOP)
    stopped = time.monotonic()
    statuses = []
    while server.process.poll() is None and time.monotonic() - stopped < 20:
        try:
            r = httpx.get(f"{server.url}/health", timeout=1)
            statuses.append((r.status_code, r.json()))
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    late = [body for status, body in statuses if status == 503]
    assert late and victim in late[0]["error"]["message"] and "no heartbeat" in late[0]["error"]["message"]
    assert server.wait_exit() == 1
    assert 6 <= time.monotonic() - stopped < 6 + EXIT_WITHIN_S
    assert re.search(rf"worker {victim} \(pid \d+\) has sent no heartbeat for \d+ s \(--watchdog-timeout 6\)",
                     server.log()), server.log()
    server.assert_nothing_left()


@pytest.mark.parametrize("server", [("--watchdog-timeout", "120")], indirect=True)
def test_a_full_request_ring_is_a_503_and_the_server_recovers_when_its_reader_resumes(server: Server) -> None:
    """With the tokenizer stopped, two 3 MB prompts fill its 8 MiB request ring; the third request waits for
    space, times out after 5 s and gets a 503 naming the tokenizer, while the API server keeps answering.
    Once the tokenizer resumes, the queued requests get their answers (400: longer than the context) and
    the server serves as before."""
    tokenizer = server.workers["tokenizer-0"]
    huge = {"prompt": "word " * 600_000, "max_tokens": 4}   # 3 MB of text, beyond any context
    queued: list[httpx.Response | Exception] = []

    def post_queued() -> None:
        try:
            queued.append(httpx.post(f"{server.url}/v1/completions", json=huge, timeout=120))
        except httpx.HTTPError as exc:
            queued.append(exc)

    os.kill(tokenizer, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=post_queued) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(1.0)   # in order: both records are in the ring before the third comes
        start = time.monotonic()
        refused = httpx.post(f"{server.url}/v1/completions", json=huge, timeout=60)
        waited = time.monotonic() - start
        assert refused.status_code == 503, refused.text
        assert "tokenizer" in refused.json()["error"]["message"] and 4.5 <= waited < 15, (waited, refused.text)
        assert httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200   # the API kept serving
    finally:
        os.kill(tokenizer, signal.SIGCONT)
    for thread in threads:
        thread.join(60)
    statuses = [r.status_code for r in queued if isinstance(r, httpx.Response)]
    assert statuses == [400, 400], [getattr(r, "text", r) for r in queued]
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]


def test_workers_exit_when_the_parent_is_killed(server: Server) -> None:
    server.process.kill()
    server.process.wait()
    server.assert_nothing_left(within=EXIT_WITHIN_S)


def test_a_bad_model_is_a_clear_error_and_leaves_nothing() -> None:
    with tempfile.TemporaryDirectory() as empty:
        process = subprocess.Popen([sys.executable, "-m", "minisrv.cli", "serve", "--model", empty,
                                    "--port", str(free_port())], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        out = process.communicate(timeout=STARTUP_TIMEOUT_S)[0]
    assert process.returncode != 0
    assert f"minisrv serve: error: model: {empty!r} has no config.json" in out
    assert "Traceback" not in out
    assert [n for n in os.listdir("/dev/shm") if n.removeprefix("sem.").startswith(f"minisrv-{process.pid}-")] == []


def test_tp_size_over_the_gpus_there_are_is_a_clear_error() -> None:
    out = subprocess.run([sys.executable, "-m", "minisrv.cli", "serve", "--device", "cuda", "--tp-size", "2",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "--tp-size 2: needs 2 CUDA devices, found" in out.stderr, out.stderr


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)}(?:{{model_name=\"[^\"]*\"}})? (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0
