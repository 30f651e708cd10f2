"""minisrv's shared-memory pipeline against the same pipeline over ZeroMQ + msgpack, measured from HTTP clients.

Each run starts the real server (the API process with HTTP and SSE, a tokenizer worker, the scheduler loop, the
detokenizer) around NullEngine, a model-free engine that gives every running request one token per step after
--step-ms, so that only the pipeline is measured. It runs once with the shared-memory rings and once with every
ring replaced by ZeroMQ PUSH/PULL over ipc:// carrying msgpack (bench/zmq_channels.py, behind the same channel
interface). Client processes stream completions and read the server's --sse-timestamps comments:
  latency    per token, from the scheduler sending it to a client reading its SSE chunk (one monotonic clock on
             one host), p50 and p99
  tokens/s   streamed tokens over all streams per second of the run; at a 0 ms step the engine never waits,
             so this is what one API process sustains
for each number of concurrent streams, at a 0 ms step and a 1 ms step (what the GPU engine aims at).
With --api-server-counts, the rings also run with that many API server processes (--api-server-count), to
measure how the HTTP side scales out.

    python bench/pipeline.py --quick                 # a few minutes
    python bench/pipeline.py --json bench/results/pipeline.json --plot bench/results/pipeline.png
    python bench/pipeline.py --transports ring --api-server-counts 1,2,4 --step-ms 0 --streams 64,256
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
from types import SimpleNamespace

from machine import machine

from minisrv.config import EngineConfig, ServerConfig
from minisrv.models.source import ModelSource
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.metrics import RequestMetrics
from minisrv.scheduler.request import RequestOutput, SampleResult
from minisrv.wire.terms import FinishReason, SchedulerStats

TRANSPORTS = ("ring", "zmq")
PROFILE_ENV = "BENCH_PIPELINE_PROFILE"   # --profile-api: where the API process writes its cProfile stats
PROMPT = "Hello"
TOKEN_TEXTS = (b"world", b"~")
START_DELAY_NS = 300_000_000   # every client of a run starts at once, this long after the run is handed out
LATE_START_MS = 5.0   # NullEngine.TOKEN's text, NullEngine.BYTE_TOKEN's


class NullEngine:
    """LLMEngine's interface without a model: every running request gets one token per step."""

    TOKEN = 905   # " world" in the embedded model's vocabulary
    BYTE_TOKEN = ord("~")   # in a preset's byte-level vocabulary (minisrv/models/dummy.py); in no JSON we send

    def __init__(self, config: EngineConfig, source: ModelSource, step_s: float = 0.0) -> None:
        self.step_s = step_s   # stands in for the model's time per step
        self.token = self.BYTE_TOKEN if source.format == "preset" else self.TOKEN
        self.loaded = SimpleNamespace(name="null", max_model_len=config.max_model_len or 8192,
                                      model_config=SimpleNamespace(vocab_size=49152))
        self.requests: dict[int, tuple[int, int, list[int]]] = {}
        self._metrics = RequestMetrics()   # never observed: the pipeline is what this benchmark measures

    def add_request(self, rid: int, prompt_ids: list[int], params: SamplingParams, grammar=None,
                    arrival: float | None = None, priority: int = 0) -> None:
        self.requests[rid] = (len(prompt_ids), params.max_tokens or 16, [])

    def abort(self, rid: int) -> RequestOutput | None:
        prompt, _, out = self.requests.pop(rid, (0, 0, None))
        return None if out is None else RequestOutput(rid, [], [], FinishReason.ABORT, prompt, 0, len(out))

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        if self.step_s:
            time.sleep(self.step_s)
        outputs = []
        for rid, (prompt, max_tokens, out) in list(self.requests.items()):
            out.append(self.token)
            finish = FinishReason.LENGTH if len(out) == max_tokens else FinishReason.NONE
            outputs.append(RequestOutput(rid, [self.token], [SampleResult(self.token)], finish, prompt, 0, len(out)))
            if finish:
                del self.requests[rid]
        return outputs

    def stats(self) -> SchedulerStats:
        return SchedulerStats(num_running=len(self.requests))

    def metrics(self) -> RequestMetrics:
        return self._metrics


# --- the server (a subprocess: `--serve`) -------------------------------------------------------------------

def serve(transport: str, step_ms: float, port: int, stream_interval: int, model: str, api_servers: int) -> int:
    import logging

    import uvloop

    from minisrv.models.source import resolve_source
    from minisrv.runtime.channels import RingChannels
    from minisrv.runtime.launch import serve_pipeline
    from minisrv.runtime.pipeline import Pipeline

    logging.basicConfig(level="WARNING", stream=sys.stderr, format="%(asctime)s api-server %(levelname)s %(message)s")
    engine = EngineConfig(model=model, load_format="auto" if model == "embedded" else "dummy", max_model_len=8192)
    config = ServerConfig(engine=engine, port=port, log_level="warning", sse_timestamps=True,
                          stream_interval=stream_interval, api_server_count=api_servers)
    if transport == "zmq":
        from zmq_channels import ZmqChannels   # pyzmq only where the comparison runs

        channels = ZmqChannels()
    else:
        channels = RingChannels()
    pipeline = Pipeline(config, resolve_source(config.engine), channels=channels,
                        make_engine=partial(NullEngine, step_s=step_ms / 1e3))
    profile_path = os.environ.get(PROFILE_ENV)
    if not profile_path:
        return uvloop.run(serve_pipeline(config, pipeline))
    import cProfile

    with cProfile.Profile() as profile:
        code = uvloop.run(serve_pipeline(config, pipeline))
    profile.dump_stats(profile_path)
    return code


class Server:
    def __init__(self, transport: str, step_ms: float, stream_interval: int, model: str, api_servers: int,
                 profile: str | None = None) -> None:
        with socket.socket() as probe:   # a free port
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **({PROFILE_ENV: f"{profile}.{transport}-{step_ms:g}ms"} if profile else {})}
        self.process = subprocess.Popen([sys.executable, __file__, "--serve", transport, str(step_ms), str(self.port),
                                         str(stream_interval), model, str(api_servers)], env=env)

    def wait_ready(self, timeout: float = 300.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited with {self.process.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the server was not ready within {timeout} s")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


# --- clients (separate processes, so the measuring side does not share the API process's core) ---------------

async def stream_requests(url: str, streams: int, tokens: int, start_ns: int) -> dict:
    import aiohttp

    latencies: list[int] = []
    received = 0
    last_ns = 0
    body = {"model": "null", "prompt": PROMPT, "max_tokens": tokens, "stream": True, "ignore_eos": True}

    async def one(session: aiohttp.ClientSession) -> None:
        nonlocal received, last_ns
        emitted = 0
        async with session.post(f"{url}/v1/completions", json=body) as response:
            response.raise_for_status()
            async for line in response.content:
                if line.startswith(b": emitted "):
                    emitted = int(line[10:])
                elif line.startswith(b"data: {"):
                    # A chunk may carry several tokens (the server merges those that queue up); each is
                    # NullEngine's " world", and each gets the latency of the chunk's first, an upper bound.
                    now, tokens_in_chunk = time.monotonic_ns(), sum(line.count(text) for text in TOKEN_TEXTS)
                    latencies.extend([now - emitted] * tokens_in_chunk)
                    received += tokens_in_chunk
                    last_ns = max(last_ns, now)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        while time.monotonic_ns() < start_ns:
            await asyncio.sleep(max(0.0, (start_ns - time.monotonic_ns()) / 1e9))
        late_ns = time.monotonic_ns() - start_ns
        await asyncio.gather(*(one(session) for _ in range(streams)))
    return {"latencies": latencies, "received": received, "last_ns": last_ns, "late_ns": late_ns}


def import_client_libraries() -> None:
    """Each client process imports these when the pool starts, not inside a timed run."""
    import aiohttp  # noqa: F401
    import uvloop  # noqa: F401


def client_process(url: str, streams: int, tokens: int, start_ns: int) -> dict:
    import uvloop

    return uvloop.run(stream_requests(url, streams, tokens, start_ns))


@dataclass
class Result:
    transport: str
    streams: int
    step_ms: float
    p50_token_latency_us: float
    p99_token_latency_us: float
    tokens_per_s: float
    api_servers: int = 1


def measure(pool, url: str, transport: str, step_ms: float, streams: int, tokens: int, clients: int,
            api_servers: int = 1) -> Result:
    shares = [streams // clients + (i < streams % clients) for i in range(min(clients, streams))]
    start_ns = time.monotonic_ns() + START_DELAY_NS
    parts = pool.starmap(client_process, [(url, share, tokens, start_ns) for share in shares])
    latencies = sorted(lat for part in parts for lat in part["latencies"])
    received = sum(part["received"] for part in parts)
    if received != streams * tokens:
        raise SystemExit(f"{transport}, {streams} streams: received {received} tokens, expected {streams * tokens}")
    late_ms = max(part["late_ns"] for part in parts) / 1e6
    if late_ms > LATE_START_MS:   # the run's clock started without that client: its tokens/s would read low
        print(f"warning: {transport}, {streams} streams: a client started {late_ms:.0f} ms late", file=sys.stderr)
    seconds = (max(part["last_ns"] for part in parts) - start_ns) / 1e9
    return Result(transport, streams, step_ms, latencies[len(latencies) // 2] / 1e3,
                  latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1e3, received / seconds, api_servers)


def table(results: list[Result]) -> str:
    lines = [f"{'step ms':>7} {'streams':>7} | {'p50 us ring':>11} {'zmq':>9} {'ratio':>6} | {'p99 us ring':>11} "
             f"{'zmq':>9} | {'tok/s ring':>10} {'zmq':>9} {'ratio':>6}"]
    keys = sorted({(r.step_ms, r.streams) for r in results})
    for step_ms, streams in keys:
        by = {r.transport: r for r in results if (r.step_ms, r.streams, r.api_servers) == (step_ms, streams, 1)}
        if set(by) != set(TRANSPORTS):
            continue
        ring, zmq = by["ring"], by["zmq"]
        lines.append(f"{step_ms:>7g} {streams:>7} | {ring.p50_token_latency_us:>11.0f} {zmq.p50_token_latency_us:>9.0f} "
                     f"{ring.p50_token_latency_us / zmq.p50_token_latency_us:>5.2f}x | "
                     f"{ring.p99_token_latency_us:>11.0f} {zmq.p99_token_latency_us:>9.0f} | "
                     f"{ring.tokens_per_s:>10.0f} {zmq.tokens_per_s:>9.0f} {ring.tokens_per_s / zmq.tokens_per_s:>5.2f}x")
    return "\n".join(lines)


def scaling_table(results: list[Result]) -> str:
    """The rings with N API server processes against one: tokens/s and its ratio, p50 latency."""
    counts = sorted({r.api_servers for r in results if r.transport == "ring"})
    lines = [f"{'step ms':>7} {'streams':>7} | " + " ".join(f"{f'tok/s x{n}':>10}" for n in counts) + " | "
             + " ".join(f"{f'ratio x{n}':>9}" for n in counts[1:]) + " | "
             + " ".join(f"{f'p50 us x{n}':>10}" for n in counts)]
    for step_ms, streams in sorted({(r.step_ms, r.streams) for r in results}):
        by = {r.api_servers: r for r in results
              if r.transport == "ring" and (r.step_ms, r.streams) == (step_ms, streams)}
        if set(by) != set(counts):
            continue
        lines.append(f"{step_ms:>7g} {streams:>7} | " + " ".join(f"{by[n].tokens_per_s:>10.0f}" for n in counts)
                     + " | " + " ".join(f"{by[n].tokens_per_s / by[1].tokens_per_s:>8.2f}x" for n in counts[1:])
                     + " | " + " ".join(f"{by[n].p50_token_latency_us:>10.0f}" for n in counts))
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted({r.step_ms for r in results})
    fig, axes = plt.subplots(1, len(steps) + 1, figsize=(5 * (len(steps) + 1), 4.2))
    for ax, step_ms in zip(axes, steps):
        for transport, color in zip(TRANSPORTS, ("tab:green", "tab:red")):
            rows = sorted((r for r in results if (r.transport, r.step_ms, r.api_servers) == (transport, step_ms, 1)),
                          key=lambda r: r.streams)
            ax.plot([r.streams for r in rows], [r.p50_token_latency_us for r in rows], "o-", color=color,
                    label=f"{transport} p50")
            ax.plot([r.streams for r in rows], [r.p99_token_latency_us for r in rows], "o--", color=color,
                    alpha=0.5, label=f"{transport} p99")
        ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="added latency per token (us)",
               title=f"step {step_ms:g} ms")
        ax.legend()
    ax = axes[-1]
    for transport, color in zip(TRANSPORTS, ("tab:green", "tab:red")):
        rows = sorted((r for r in results if (r.transport, r.step_ms, r.api_servers) == (transport, 0, 1)),
                      key=lambda r: r.streams)
        ax.plot([r.streams for r in rows], [r.tokens_per_s for r in rows], "o-", color=color, label=transport)
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="streamed tokens/s", title="step 0 ms: throughput")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        transport, step_ms, port, interval = sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        sys.exit(serve(transport, step_ms, port, interval, sys.argv[6], int(sys.argv[7])))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer stream counts and tokens (a few minutes)")
    parser.add_argument("--streams", help="comma-separated concurrent streams (default 1,4,16,64,256; quick 1,16,256)")
    parser.add_argument("--step-ms", default="0,1", help="comma-separated NullEngine step times")
    parser.add_argument("--model", default="embedded",
                        help="whose tokenizer the pipeline runs: 'embedded', or a preset name (a byte-level vocabulary, "
                             "for machines that cannot fetch the embedded model)")
    parser.add_argument("--tokens", type=int, help="tokens per stream (default 256; quick 64)")
    parser.add_argument("--clients", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="client processes (default: half the cores)")
    parser.add_argument("--stream-interval", type=int, default=1, help="the server's --stream-interval")
    parser.add_argument("--transports", default=",".join(TRANSPORTS), help="comma-separated: ring, zmq")
    parser.add_argument("--api-server-counts", default="1",
                        help="comma-separated API server process counts the rings also run with (1 always runs)")
    parser.add_argument("--profile-api", metavar="PATH",
                        help="run each server's API process under cProfile, stats to PATH.<transport>-<step>ms")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG of latency and throughput against streams")
    args = parser.parse_args()
    streams = [int(s) for s in (args.streams or ("1,16,256" if args.quick else "1,4,16,64,256")).split(",")]
    tokens = args.tokens or (64 if args.quick else 256)
    steps = [float(s) for s in args.step_ms.split(",")]
    runs = [(transport, 1) for transport in args.transports.split(",")]
    runs += [("ring", int(n)) for n in args.api_server_counts.split(",") if int(n) != 1]
    results: list[Result] = []
    with multiprocessing.get_context("spawn").Pool(args.clients, import_client_libraries) as pool:
        for step_ms in steps:
            for transport, api_servers in runs:
                server = Server(transport, step_ms, args.stream_interval, args.model, api_servers, args.profile_api)
                try:
                    server.wait_ready()
                    measure(pool, server.url, transport, step_ms, args.clients, 8, args.clients)   # warm-up
                    for count in streams:
                        result = measure(pool, server.url, transport, step_ms, count, tokens, args.clients,
                                         api_servers)
                        print(f"{transport:4} x{api_servers} step {step_ms:g} ms, {count:3} streams: p50 "
                              f"{result.p50_token_latency_us:8.0f} us, p99 {result.p99_token_latency_us:8.0f} us, "
                              f"{result.tokens_per_s:8.0f} tokens/s", flush=True)
                        results.append(result)
                finally:
                    server.stop()
    setup = {**machine(), "stream_interval": args.stream_interval, "tokens_per_stream": tokens,
             "clients": args.clients}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": setup, "results": [asdict(r) for r in results]}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    print()
    print(f"{setup['cpu']}, {setup['cores']} cores; {tokens} tokens a stream, stream interval "
          f"{args.stream_interval}; ratio = ring / zmq")
    if len(args.transports.split(",")) > 1:
        print(table(results))
    if len(runs) > len(args.transports.split(",")):
        print("\nrings with N API server processes (--api-server-count N); ratio = tokens/s against one")
        print(scaling_table(results))


if __name__ == "__main__":
    main()
