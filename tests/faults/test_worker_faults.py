"""Workers killed, stopped, or starved of ring space while requests run: what clients see, the exit code and
message, no process left within 5 s, nothing left in /dev/shm. Each test starts its own server, since each
ends it."""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.faults.harness import (EXIT_WITHIN_S, LONG_REQUEST, Server, first_events, metric, post_in_background,
                                  server, streams_on_every_api_server)  # noqa: F401 (server: the fixture)


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


@pytest.mark.parametrize("server", [("--api-server-count", "2")], indirect=True)
@pytest.mark.parametrize("victim", ["scheduler", "api-server-1"])
def test_with_two_api_servers_a_dead_worker_ends_the_streams_of_both_with_an_error(server: Server,
                                                                                   victim: str) -> None:
    """Streams of the API server processes still alive end with an error event; one on a killed API server
    process loses its connection (nothing is left to answer it)."""
    with ExitStack() as stack:
        streams = streams_on_every_api_server(server, stack)
        os.kill(server.workers[victim], signal.SIGKILL)
        killed = time.monotonic()
        for pid, lines in streams.items():
            if pid == server.workers[victim]:
                with pytest.raises(httpx.HTTPError):
                    list(lines)
                continue
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert "error" in events[-1] and "going down" in events[-1]["error"]["message"], (pid, events[-1])
    assert server.wait_exit() != 0
    assert time.monotonic() - killed < EXIT_WITHIN_S
    assert re.search(rf"worker {victim} \(pid \d+\) (died|exited)", server.log()), server.log()
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


@pytest.mark.parametrize("under_load", [False, True], ids=["idle", "under-load"])
def test_workers_exit_when_the_parent_is_killed(server: Server, under_load: bool) -> None:
    """kill -9 of the API server, idle or with streams running: every worker notices and goes within 5 s."""
    if under_load:
        threads = [post_in_background(server)[0] for _ in range(4)]
        running_both = time.monotonic() + 30
        while metric(server, "minisrv:num_requests_running") < 4 and time.monotonic() < running_both:
            time.sleep(0.05)
        assert metric(server, "minisrv:num_requests_running") == 4
    server.process.kill()
    server.process.wait()
    server.assert_nothing_left(within=EXIT_WITHIN_S)
    if under_load:
        for thread in threads:
            thread.join(10)
