"""--max-connections: idle clients hold at most that many connections; the next gets a 503 at once and is closed,
the open ones are counted on /metrics, and a freed slot serves again."""
from __future__ import annotations

import json
import re
import socket

import httpx
import pytest
from tests.server.live_server import LiveServer

LIMIT = 4


@pytest.fixture(scope="module")
def server():
    with LiveServer(["--max-connections", str(LIMIT), "--max-model-len", "256"]) as s:
        yield s


def connect(server: LiveServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def get(sock: socket.socket, path: str) -> str:
    """One keep-alive GET on an open connection; the whole response as text."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode()


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^minisrv:{name}{{[^}}]*}} (\S+)$", text, re.M).group(1))


def test_connections_past_the_limit_get_a_503_and_a_freed_one_serves_again(server) -> None:
    idle = [connect(server) for _ in range(LIMIT - 1)]   # open, silent
    counted = connect(server)
    metrics = get(counted, "/metrics")
    assert metric(metrics, "http_connections") == LIMIT and metric(metrics, "http_connections_limit") == LIMIT
    extra = connect(server)
    refused = read_all(extra).decode()   # answered before it sent anything, then closed
    extra.close()
    head, _, body = refused.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 503 Service Unavailable") and "connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert "--max-connections" in error["message"] and error["type"]
    assert metric(get(counted, "/metrics"), "http_connections_refused_total") == 1
    for sock in idle:
        sock.close()
    counted.close()
    # The slots free as the connections close: new clients are served again.
    for _ in range(3 * LIMIT):
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    with httpx.Client(timeout=10) as client:
        text = client.get(f"{server.url}/metrics").text
    assert metric(text, "http_connections") == 1
