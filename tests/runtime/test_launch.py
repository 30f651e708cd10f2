"""Lifecycle of a live `minisrv serve` (embedded model): signals end it cleanly, bad start-up arguments are clear
errors. Workers killed or stopped under load: tests/faults/test_worker_faults.py."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack

import httpx
import pytest

from tests.faults.harness import (EXIT_WITHIN_S, LONG_REQUEST, Server, first_events, metric, post_in_background,
                                  server, streams_on_every_api_server)  # noqa: F401 (server: the fixture)
from tests.server.live_server import STARTUP_TIMEOUT_S, free_port


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
        while metric(server, "minisrv:num_requests_running") < 2 and time.monotonic() < running_both:
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


@pytest.mark.parametrize("server", [("--api-server-count", "2")], indirect=True)
def test_a_signal_ends_the_streams_of_every_api_server_process_with_abort(server: Server) -> None:
    with ExitStack() as stack:
        streams = streams_on_every_api_server(server, stack)
        server.process.send_signal(signal.SIGTERM)
        for pid, lines in streams.items():
            chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert chunks[-1]["choices"][0]["finish_reason"] == "abort", (pid, chunks[-1], server.log())
    assert server.wait_exit() == 0, server.log()
    server.assert_nothing_left()


@pytest.mark.parametrize("count", [1, 2])
def test_a_port_in_use_is_a_clear_error_before_anything_starts(count: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "minisrv.cli", "serve", "--port", str(port),
                              "--api-server-count", str(count)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"minisrv serve: error: host, port (--host 127.0.0.1 --port {port}): cannot listen there" in out.stderr
    assert "Traceback" not in out.stderr and "workers:" not in out.stderr, out.stderr


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
