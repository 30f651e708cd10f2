"""Data-parallel scheduler replicas (--dp-size) behind one API server, live on the CPU: the same answers as one
scheduler, requests routed to the replica whose cache holds their prefix, /flush_cache reaching both, and a dead replica
ending the server."""
from __future__ import annotations

import os
import re
import signal
import time

import httpx

from minisrv.llm import LLM
from minisrv.sampling_params import SamplingParams
from tests.faults.harness import EXIT_WITHIN_S, Server, metric

SYSTEM = "You are a terse assistant who answers in one line. " * 8   # several KV pages of shared prefix


def _complete(server: Server, prompt: str) -> str:
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    reply = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    return reply["choices"][0]["text"]


def test_two_replicas_answer_like_one_route_by_prefix_and_go_down_together() -> None:
    prompts = [SYSTEM + "Name a colour.", SYSTEM + "Name a fruit.", "Count to five:"]
    # float32: the int4 kernel's sums depend on its thread count, and each replica gets one core of two;
    # bfloat16 (the default where the CPU multiplies it) rounds them differently again
    llm = LLM(device="cpu", max_model_len=1024, dtype="float32", quantization="none")
    expected = [out.text for out in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16,
                                                                         ignore_eos=True))]
    server = Server("--dp-size", "2", "--device", "cpu", "--dtype", "float32", "--quantization", "none")
    try:
        assert {"scheduler-dp0", "scheduler-dp1"} <= set(re.findall(r"(scheduler-dp\d) \(pid", server.log()))
        assert _complete(server, prompts[0]) == expected[0]
        hits = metric(server, "minisrv:prefix_cache_hits_total")
        # Both replicas are idle: balance alone would send the next request to the other one (round robin);
        # its prefix is cached where the first went, so it goes there and hits the cache.
        assert _complete(server, prompts[1]) == expected[1]
        assert metric(server, "minisrv:prefix_cache_hits_total") - hits >= 64
        assert _complete(server, prompts[2]) == expected[2]
        # SGLang's /flush_cache empties both replicas' caches before it answers: the prefix is computed again.
        assert httpx.post(f"{server.url}/flush_cache", timeout=60).status_code == 200
        hits = metric(server, "minisrv:prefix_cache_hits_total")
        assert _complete(server, prompts[1]) == expected[1]
        assert metric(server, "minisrv:prefix_cache_hits_total") == hits
        pid = int(re.search(r"scheduler-dp1 \(pid (\d+)\)", server.log()).group(1))
        with open(f"/proc/{pid}/comm") as comm:   # top and ps name each worker's role
            assert comm.read().strip() == "scheduler-dp1"
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        assert server.wait_exit() != 0
        assert time.monotonic() - killed < EXIT_WITHIN_S
        assert re.search(r"worker scheduler-dp1 \(pid \d+\) (died|exited)", server.log()), server.log()
        server.assert_nothing_left()
    finally:
        server.close()
