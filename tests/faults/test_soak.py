"""A soak of mixed traffic on the embedded model, compressed into well under a minute (MINISRV_SOAK_S to lengthen):
streams read to the end, streams cancelled after a few chunks, n > 1 with stop strings, long prompts, and bad
requests, from several clients at once. Every response must be well formed (no 5xx, every stream ending in
[DONE], every error an OpenAI error body); afterwards nothing may be running, no KV page held, and the server's
processes may not have grown in open files or memory beyond a bound."""
from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from tests.server.live_server import LiveServer

SOAK_S = float(os.environ.get("MINISRV_SOAK_S", "30"))
CLIENTS = 6

pytestmark = pytest.mark.slow


def server_pids(root: int) -> list[int]:
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def footprint(root: int) -> tuple[int, int]:
    """(open file descriptors, resident bytes) of the server and all its workers."""
    fds = rss = 0
    for pid in server_pids(root):
        fds += len(os.listdir(f"/proc/{pid}/fd"))
        rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return fds, rss


def metrics(url: str) -> dict[str, float]:
    found = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("minisrv:"):
            name, value = line.rsplit(" ", 1)
            found[re.sub(r"\{.*\}", "", name)] = float(value)
    return found


class Client:
    def __init__(self, url: str, seed: int, deadline: float, failures: list[str]) -> None:
        self.url, self.rng, self.deadline, self.failures = url, random.Random(seed), deadline, failures
        self.counts: dict[str, int] = {}

    def run(self) -> None:
        actions = [self.stream_to_the_end, self.stream_then_cancel, self.n_with_stops, self.long_prompt,
                   self.bad_request]
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < self.deadline:
                action = self.rng.choice(actions)
                try:
                    action(http)
                    self.counts[action.__name__] = self.counts.get(action.__name__, 0) + 1
                except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                    self.failures.append(f"{action.__name__}: {type(exc).__name__}: {exc}")

    def words(self, n: int) -> str:
        return " ".join(self.rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "then", "slept"])
                        for _ in range(n))

    def events(self, response: httpx.Response, limit: int | None = None) -> list[dict]:
        assert response.status_code == 200, response.read()
        events, done = [], False
        for line in response.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                events.append(json.loads(line[6:]))
                assert "error" not in events[-1], events[-1]
                if limit is not None and len(events) >= limit:
                    return events
        assert done, "a stream ended without [DONE]"
        return events

    def stream_to_the_end(self, http: httpx.Client) -> None:
        body = {"prompt": self.words(12), "max_tokens": self.rng.randint(4, 24), "stream": True,
                "stream_options": {"include_usage": True}}
        with http.stream("POST", f"{self.url}/v1/completions", json=body) as response:
            events = self.events(response)
        assert events[-1]["usage"]["completion_tokens"] <= body["max_tokens"]

    def stream_then_cancel(self, http: httpx.Client) -> None:
        body = {"messages": [{"role": "user", "content": self.words(8)}], "max_tokens": 200, "stream": True,
                "ignore_eos": True}
        with http.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
            self.events(response, limit=3)   # then leave: the server must abort it and free its pages

    def n_with_stops(self, http: httpx.Client) -> None:
        body = {"prompt": self.words(10), "max_tokens": 16, "n": 3, "stop": ["the", "\n"], "seed": 7,
                "temperature": 0.9}
        out = http.post(f"{self.url}/v1/completions", json=body)
        assert out.status_code == 200, out.text
        choices = out.json()["choices"]
        assert sorted(c["index"] for c in choices) == [0, 1, 2]
        assert all(c["finish_reason"] in ("stop", "length") and "the" not in c["text"].split() for c in choices)

    def long_prompt(self, http: httpx.Client) -> None:
        out = http.post(f"{self.url}/v1/completions", json={"prompt": self.words(700), "max_tokens": 2})
        assert out.status_code == 200 and out.json()["usage"]["prompt_tokens"] > 500, out.text

    def bad_request(self, http: httpx.Client) -> None:
        bodies = [b'{"prompt": "x", "max_tokens": ', json.dumps({"prompt": "x", "bogus_field": 1}).encode(),
                  json.dumps({"prompt": "x", "temperature": -1}).encode(),
                  json.dumps({"messages": [], "max_tokens": 2}).encode()]
        out = http.post(f"{self.url}/v1/completions", content=self.rng.choice(bodies),
                        headers={"Content-Type": "application/json"})
        assert 400 <= out.status_code < 500 and out.json()["error"]["message"], out.text


@pytest.mark.parametrize("flags", [[], ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']],
                         ids=["plain", "drafting"])
def test_mixed_traffic_soak(flags: list[str]) -> None:
    with LiveServer(["--max-model-len", "1024", *flags]) as server:
        warm = Client(server.url, 0, 0.0, [])
        with httpx.Client(timeout=120) as http:
            warm.stream_to_the_end(http)
            warm.long_prompt(http)
        fds_before, rss_before = footprint(server.process.pid)
        failures: list[str] = []
        deadline = time.monotonic() + SOAK_S
        clients = [Client(server.url, seed, deadline, failures) for seed in range(1, CLIENTS + 1)]
        threads = [threading.Thread(target=c.run) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(SOAK_S + 300)
        assert not failures, failures[:5]
        done = {}
        for c in clients:
            for name, count in c.counts.items():
                done[name] = done.get(name, 0) + count
        assert len(done) == 5 and sum(done.values()) >= CLIENTS, done   # every kind of traffic ran
        settled = time.monotonic() + 15
        while time.monotonic() < settled:
            m = metrics(server.url)
            if m["minisrv:num_requests_running"] == 0 and m["minisrv:kv_cache_usage_perc"] == 0:
                break
            time.sleep(0.2)
        assert m["minisrv:num_requests_running"] == 0 and m["minisrv:num_requests_waiting"] == 0, m
        assert m["minisrv:kv_cache_usage_perc"] == 0, m
        fds_after, rss_after = footprint(server.process.pid)
        assert fds_after <= fds_before + 16, (fds_before, fds_after)
        assert rss_after <= rss_before * 1.25 + (200 << 20), (rss_before >> 20, rss_after >> 20)
        print(f"soak: {done}; fds {fds_before} -> {fds_after}; RSS {rss_before >> 20} -> {rss_after >> 20} MiB")
        assert httpx.get(f"{server.url}/health").status_code == 200
