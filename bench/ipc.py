"""Our shared-memory rings against ZeroMQ + msgpack (mini-sglang's transport) and multiprocessing.Queue.

    python bench/ipc.py [--quick] [--json bench/results/ipc.json] [--plot bench/results/ipc.png]
    python bench/ipc.py --load bench/results/ipc.json       # re-print a saved run

Two processes each time: this one (the client) and a spawned peer. Ping-pong: the client sends a
64-byte record or an 8 KiB token-id array (2048 int32), the peer echoes it, the client times the round
trip. Rows: `ring-block` (both ends use the blocking `read()`: it polls for SPIN_BEFORE_SLEEP_S,
then sleeps on its semaphore), `ring-sleep` (the same with no spinning: every message is a
semaphore wake-up), `ring-poll` (both ends spin on the ring), `ring-asyncio` (the client awaits an
AsyncRingReader on uvloop, which never spins: the loop has other work; its peer does not spin either), `zmq-msgpack` (PUSH/PULL over
ipc://, every message msgpack-packed, as mini-sglang does), `zmq-asyncio` (the client on zmq.asyncio
under uvloop), `mp-queue` (multiprocessing.Queue). msgpack packs the payload as one bin object, the
cheapest use of it, so the ZeroMQ rows are a best case (mini-sglang packs token ids as int lists).
Stream: the peer sends 64-byte records one way as fast as it can; `ring-stream` (write_many: batch
frames, one index publication per batch; the client drains copies, one bytes object per record)
against `zmq-stream` (one message per record; ZeroMQ batches them on the wire itself).
Wake-up study (the asyncio consumer's design decision, no ring involved): the peer wakes a uvloop
client through `wake-thread` (a thread blocked on a POSIX semaphore calls call_soon_threadsafe),
`wake-eventfd` (the loop watches an inherited eventfd) or `wake-fifo` (the loop watches a named FIFO).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from multiprocessing.reduction import DupFd

import msgpack
import numpy as np
import posix_ipc
import uvloop
import zmq
import zmq.asyncio

from machine import machine as shared_machine

from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.ipc.aio import AsyncRingReader
from minisrv.ipc.ring import SPIN_BEFORE_SLEEP_S
from minisrv.ipc.wakeup import FifoDoorbell

SPAWN = multiprocessing.get_context("spawn")
RING_CAPACITY = 1 << 20
STREAM_RECORD_BYTES = 64
STREAM_BATCH = 256


@dataclass
class Result:
    transport: str
    msg_bytes: int
    p50_us: float | None
    p90_us: float | None
    p99_us: float | None
    p999_us: float | None
    rps: float
    samples: int = 0     # timed round trips (ping-pong) or records (stream)


def latency_result(transport: str, msg_bytes: int, round_trips_ns: list[int], elapsed_s: float) -> Result:
    p50, p90, p99, p999 = np.percentile(np.array(round_trips_ns) / 1e3, [50, 90, 99, 99.9]).tolist()
    return Result(transport, msg_bytes, p50, p90, p99, p999, len(round_trips_ns) / elapsed_s, len(round_trips_ns))


def payloads() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.bytes(64), rng.integers(0, 50_000, 2048, dtype=np.int32).tobytes()]


# --- peers (run in the spawned process): echo until STOP, or stream ----------------------------------

STOP = b""   # the client's last message: the echo peer exits without answering it


def ring_echo(ping_spec, pong_spec, mode: str) -> None:
    gc.disable()
    spin_s = 0.0 if mode == "sleep" else SPIN_BEFORE_SLEEP_S
    with RingReader(ping_spec) as reader, RingWriter(pong_spec) as writer:
        while True:
            if mode == "poll":
                while (record := reader.try_read()) is None:
                    pass
            else:
                record = reader.read(timeout=60, spin_s=spin_s)
            if record == STOP:
                return
            while not writer.try_write(record):   # never full in ping-pong
                pass


def zmq_echo(ping_addr: str, pong_addr: str) -> None:
    gc.disable()
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.connect(ping_addr)
    push.connect(pong_addr)
    while (message := msgpack.unpackb(pull.recv())) != STOP:
        push.send(msgpack.packb(message))
    context.destroy(linger=1000)


def queue_echo(ping: multiprocessing.Queue, pong: multiprocessing.Queue) -> None:
    gc.disable()
    while (message := ping.get()) != STOP:
        pong.put(message)


def ring_stream_producer(spec, count: int) -> None:
    gc.disable()
    batch = [bytes(range(STREAM_RECORD_BYTES))] * STREAM_BATCH
    with RingWriter(spec) as writer:
        for sent in range(0, count, STREAM_BATCH):
            writer.write_many(batch[: count - sent], timeout=60)


def zmq_stream_producer(addr: str, count: int) -> None:
    gc.disable()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(addr)
    record = bytes(range(STREAM_RECORD_BYTES))
    for _ in range(count):
        push.send(msgpack.packb(record))
    context.destroy(linger=10_000)


def wake_peer(kind: str, ping_name: str, pong: object, count: int) -> None:
    """Block on a semaphore; answer each post through the mechanism under study."""
    gc.disable()
    ping = posix_ipc.Semaphore(ping_name)
    if kind == "thread":
        answer = posix_ipc.Semaphore(pong).release
    elif kind == "eventfd":
        fd = pong.detach()
        answer = lambda: os.write(fd, b"\1\0\0\0\0\0\0\0")  # noqa: E731
    else:
        answer = FifoDoorbell(pong).ring
    for _ in range(count):
        ping.acquire(60)
        answer()


# --- clients (run here) ------------------------------------------------------------------------------

def start_peer(target, *args) -> multiprocessing.Process:
    peer = SPAWN.Process(target=target, args=args, daemon=True)
    peer.start()
    return peer


@dataclass
class Plan:
    warmup: int          # round trips before timing
    count: int           # timed round trips per row and size...
    budget_s: float | None   # ...unless this many seconds pass first (a contended machine can stall a poller)
    stream_ring: int     # records in the stream rows
    stream_zmq: int


def timed_loop(round_trip, plan: Plan) -> tuple[list[int], float]:
    for _ in range(plan.warmup):
        round_trip()
    samples = []
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(plan.budget_s * 1e9) if plan.budget_s is not None else None
    for _ in range(plan.count):
        t0 = clock()
        round_trip()
        samples.append(clock() - t0)
        if deadline is not None and t0 > deadline:
            break
    return samples, (clock() - start) / 1e9


async def timed_loop_async(round_trip, plan: Plan) -> tuple[list[int], float]:
    for _ in range(plan.warmup):
        await round_trip()
    samples = []
    clock = time.perf_counter_ns
    start = clock()
    deadline = start + int(plan.budget_s * 1e9) if plan.budget_s is not None else None
    for _ in range(plan.count):
        t0 = clock()
        await round_trip()
        samples.append(clock() - t0)
        if deadline is not None and t0 > deadline:
            break
    return samples, (clock() - start) / 1e9


def bench_ring(mode: str, messages: list[bytes], plan: Plan) -> list[Result]:
    with RingSet() as rings:
        ping = rings.create("ping", RING_CAPACITY)
        pong = rings.create("pong", RING_CAPACITY, wakeup=Wakeup.FIFO if mode == "asyncio" else Wakeup.SEMAPHORE)
        # The asyncio client's peer sleeps without spinning, like ZeroMQ's: a reply is then always a
        # wake-up of the client's loop, which is what the row measures.
        peer = start_peer(ring_echo, ping.reader, pong.producer, "sleep" if mode == "asyncio" else mode)
        writer, reader = RingWriter(ping.producer), RingReader(pong.reader)
        timings = []
        if mode == "asyncio":
            async def run_all() -> list[tuple[list[int], float]]:
                consumer = AsyncRingReader(reader)
                runs = []
                for message in messages:
                    async def round_trip() -> None:
                        writer.write(message)        # never full in ping-pong: never blocks the loop
                        await consumer.drain(timeout=60)
                    runs.append(await timed_loop_async(round_trip, plan))
                consumer.close()
                return runs
            timings = uvloop.run(run_all())
        for message in messages if mode != "asyncio" else ():
            if mode == "poll":
                def round_trip() -> None:
                    writer.try_write(message)
                    while reader.try_read() is None:
                        pass
            else:
                spin_s = 0.0 if mode == "sleep" else SPIN_BEFORE_SLEEP_S

                def round_trip() -> None:
                    writer.write(message)
                    reader.read(timeout=60, spin_s=spin_s)
            timings.append(timed_loop(round_trip, plan))
        writer.write(STOP)
        peer.join(60)
        writer.close()
        reader.close()
    return [latency_result(f"ring-{mode}", len(m), samples, elapsed) for m, (samples, elapsed) in zip(messages, timings)]


def bench_zmq(use_asyncio: bool, messages: list[bytes], plan: Plan) -> list[Result]:
    with tempfile.TemporaryDirectory() as tmp:
        ping_addr, pong_addr = f"ipc://{tmp}/ping", f"ipc://{tmp}/pong"
        context = zmq.asyncio.Context() if use_asyncio else zmq.Context()
        push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
        push.bind(ping_addr)
        pull.bind(pong_addr)
        peer = start_peer(zmq_echo, ping_addr, pong_addr)
        if use_asyncio:
            async def run_all() -> list[tuple[list[int], float]]:
                runs = []
                for message in messages:
                    async def round_trip() -> None:
                        await push.send(msgpack.packb(message))
                        msgpack.unpackb(await pull.recv())
                    runs.append(await timed_loop_async(round_trip, plan))
                await push.send(msgpack.packb(STOP))
                return runs
            timings = uvloop.run(run_all())
        else:
            timings = []
            for message in messages:
                def round_trip() -> None:
                    push.send(msgpack.packb(message))
                    msgpack.unpackb(pull.recv())
                timings.append(timed_loop(round_trip, plan))
            push.send(msgpack.packb(STOP))
        peer.join(60)
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
    name = "zmq-asyncio" if use_asyncio else "zmq-msgpack"
    return [latency_result(name, len(m), samples, elapsed) for m, (samples, elapsed) in zip(messages, timings)]


def bench_queue(messages: list[bytes], plan: Plan) -> list[Result]:
    ping, pong = SPAWN.Queue(), SPAWN.Queue()
    peer = start_peer(queue_echo, ping, pong)
    results = []
    for message in messages:
        def round_trip() -> None:
            ping.put(message)
            pong.get()
        samples, elapsed = timed_loop(round_trip, plan)
        results.append(latency_result("mp-queue", len(message), samples, elapsed))
    ping.put(STOP)
    peer.join(60)
    return results


def bench_ring_stream(count: int) -> Result:
    with RingSet() as rings:
        stream = rings.create("stream", RING_CAPACITY)
        with RingReader(stream.reader) as reader:
            peer = start_peer(ring_stream_producer, stream.producer, count)
            reader.wait(timeout=60)
            start, received = time.perf_counter(), 0
            while received < count:
                reader.wait(timeout=60)
                received += len(reader.drain())
            elapsed = time.perf_counter() - start
            peer.join(60)
    return Result("ring-stream", STREAM_RECORD_BYTES, None, None, None, None, received / elapsed, received)


def bench_zmq_stream(count: int) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        addr = f"ipc://{tmp}/stream"
        context = zmq.Context()
        pull = context.socket(zmq.PULL)
        pull.bind(addr)
        peer = start_peer(zmq_stream_producer, addr, count)
        msgpack.unpackb(pull.recv())
        start, received = time.perf_counter(), 1
        while received < count:
            msgpack.unpackb(pull.recv())
            received += 1
        elapsed = time.perf_counter() - start
        peer.join(60)
        pull.close(linger=0)
        context.term()
    return Result("zmq-stream", STREAM_RECORD_BYTES, None, None, None, None, (received - 1) / elapsed, received - 1)


def bench_wake(kind: str, plan: Plan) -> Result:
    """Round trip: post the peer's semaphore, await the peer's answer on the loop."""
    prefix = f"/minisrv-bench-{os.getpid()}-{kind}"
    ping = posix_ipc.Semaphore(prefix + "-ping", posix_ipc.O_CREX, mode=0o600)
    fifo_path = f"/dev/shm{prefix}.fifo"
    try:
        if kind == "thread":
            pong = posix_ipc.Semaphore(prefix + "-pong", posix_ipc.O_CREX, mode=0o600)
            peer_end: object = pong.name
        elif kind == "eventfd":
            event_fd = os.eventfd(0, os.EFD_NONBLOCK)
            peer_end = DupFd(event_fd)           # inherited by the spawned peer
        else:
            doorbell = FifoDoorbell(fifo_path, create=True)
            peer_end = fifo_path
        peer = start_peer(wake_peer, kind, ping.name, peer_end, plan.warmup + plan.count)

        async def run() -> tuple[list[int], float]:
            loop = asyncio.get_running_loop()
            answered: asyncio.Future | None = None

            def on_answer() -> None:
                if kind == "eventfd":
                    os.read(event_fd, 8)
                elif kind == "fifo":
                    doorbell.clear()
                if answered is not None and not answered.done():
                    answered.set_result(None)

            if kind == "thread":
                def waiter() -> None:
                    for _ in range(plan.warmup + plan.count):
                        pong.acquire(60)
                        loop.call_soon_threadsafe(on_answer)
                threading.Thread(target=waiter, daemon=True).start()
            else:
                loop.add_reader(event_fd if kind == "eventfd" else doorbell.fileno(), on_answer)

            async def round_trip() -> None:
                nonlocal answered
                answered = loop.create_future()
                ping.release()
                await answered
            # Every round trip runs (no time budget): the peer answers exactly warmup + count posts.
            return await timed_loop_async(round_trip, Plan(plan.warmup, plan.count, None, 0, 0))

        samples, elapsed = uvloop.run(run())
        peer.join(60)
        return latency_result(f"wake-{kind}", 0, samples, elapsed)
    finally:
        ping.unlink()
        if kind == "thread":
            pong.unlink()
        elif kind == "fifo":
            doorbell.close()
            FifoDoorbell.unlink(fifo_path)


# --- report ------------------------------------------------------------------------------------------

def machine() -> dict[str, object]:
    return {**shared_machine(), "pyzmq": zmq.__version__, "uvloop": uvloop.__version__}


def ratio(results: list[Result], row: Result, peer: str, field: str) -> str:
    base = next((r for r in results if r.transport == peer and r.msg_bytes == row.msg_bytes), None)
    if base is None:
        return ""
    value = getattr(row, field) / getattr(base, field)
    return f"{value:.3f}x {peer}"


def table(results: list[Result]) -> str:
    lines = [f"{'transport':14} {'bytes':>6} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'p99.9 us':>9} "
             f"{'rps':>11} {'samples':>8}  ratio"]
    for row in results:
        if row.p50_us is None:
            cells, ratios = " " * 39, ratio(results, row, "zmq-stream", "rps")
        else:
            cells = " ".join(f"{v:9.2f}" for v in (row.p50_us, row.p90_us, row.p99_us, row.p999_us))
            ratios = ratio(results, row, "zmq-msgpack", "p50_us")
            if row.transport == "ring-asyncio":
                ratios += ", " + ratio(results, row, "zmq-asyncio", "p50_us")
        if row.transport.startswith(("zmq", "wake")) or row.transport == "mp-queue":
            ratios = "" if not row.transport.startswith("wake") else ratio(results, row, "wake-thread", "p50_us")
        lines.append(f"{row.transport:14} {row.msg_bytes:6d} {cells} {row.rps:11.0f} {row.samples:8d}  {ratios}")
    return "\n".join(lines)


def targets(results: list[Result]) -> str:
    def get(transport: str, msg_bytes: int = 64) -> Result:
        return next(r for r in results if r.transport == transport and r.msg_bytes == msg_bytes)
    checks = [
        ("ring-block p50 <= 0.5x zmq-msgpack (64 B)", get("ring-block").p50_us / get("zmq-msgpack").p50_us, 0.5),
        ("ring-poll p50 <= 0.05x zmq-msgpack (64 B)", get("ring-poll").p50_us / get("zmq-msgpack").p50_us, 0.05),
        ("ring-asyncio p50 <= 0.6x zmq-asyncio (64 B)", get("ring-asyncio").p50_us / get("zmq-asyncio").p50_us, 0.6),
    ]
    stream = get("ring-stream").rps / get("zmq-stream").rps
    lines = [f"{'met' if value <= limit else 'MISSED':6} {name}: {value:.3f}x" for name, value, limit in checks]
    lines.append(f"{'met' if stream >= 10 else 'MISSED':6} ring-stream >= 10x zmq-stream records/s: {stream:.1f}x")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pingpong = [r for r in results if r.p50_us is not None and not r.transport.startswith("wake")]
    stream = [r for r in results if r.p50_us is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 1]})
    names = list(dict.fromkeys(r.transport for r in pingpong))
    for offset, size in ((-0.2, 64), (0.2, 8192)):
        rows = [next(r for r in pingpong if r.transport == n and r.msg_bytes == size) for n in names]
        p50 = [r.p50_us for r in rows]
        p99 = [r.p99_us - r.p50_us for r in rows]
        left.bar([i + offset for i in range(len(names))], p50, 0.4, yerr=[[0] * len(rows), p99], capsize=3,
                 label=f"{size} B (bar p50, whisker p99)")
    left.set_xticks(range(len(names)), names, rotation=20)
    left.set_yscale("log")
    left.set_ylabel("round trip, us (log)")
    left.legend()
    left.set_title("ping-pong between two processes")
    right.bar([r.transport for r in stream], [r.rps / 1e6 for r in stream], color=["tab:green", "tab:gray"])
    right.set_ylabel("million records/s")
    right.set_title(f"one-way stream, {STREAM_RECORD_BYTES} B records")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer round trips: under a minute")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write a PNG plot")
    parser.add_argument("--only", metavar="NAMES", help="comma-separated subset of the rows, for profiling")
    parser.add_argument("--load", metavar="PATH", help="print (and --plot) a saved --json run instead of running")
    args = parser.parse_args()
    if args.load:
        with open(args.load) as saved:
            run = json.load(saved)
        results = [Result(**row) for row in run["results"]]
        if args.plot:
            plot(results, args.plot)
        print(f"{run['machine']}\n{targets(results)}\n\n{table(results)}")
        return
    plan = (Plan(300, 3000, 2.0, 500_000, 100_000) if args.quick
            else Plan(2000, 20000, 30.0, 4_000_000, 400_000))
    info = machine()
    messages = payloads()
    gc.disable()   # on both sides: a collection in the middle of a round trip is noise, not transport
    results: list[Result] = []
    for name, run in [("ring-block", lambda: bench_ring("block", messages, plan)),
                      ("ring-sleep", lambda: bench_ring("sleep", messages, plan)),
                      ("ring-poll", lambda: bench_ring("poll", messages, plan)),
                      ("ring-asyncio", lambda: bench_ring("asyncio", messages, plan)),
                      ("zmq-msgpack", lambda: bench_zmq(False, messages, plan)),
                      ("zmq-asyncio", lambda: bench_zmq(True, messages, plan)),
                      ("mp-queue", lambda: bench_queue(messages, plan)),
                      ("ring-stream", lambda: [bench_ring_stream(plan.stream_ring)]),
                      ("zmq-stream", lambda: [bench_zmq_stream(plan.stream_zmq)]),
                      ("wake-*", lambda: [bench_wake(k, plan) for k in ("thread", "eventfd", "fifo")])]:
        if args.only and name not in args.only.split(","):
            continue
        started = time.perf_counter()
        results += run()
        print(f"{name:13} done in {time.perf_counter() - started:5.1f} s", flush=True)
    info["loadavg_at_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": info, "results": [asdict(r) for r in results]}, out, indent=1)
    if args.plot:
        plot(results, args.plot)
    print(f"\n{info['cpu']}, {info['cores_allowed']} of {info['cores']} cores, load average "
          f"{info['loadavg_at_start']} -> {info['loadavg_at_end']}")
    if not args.only:
        print(targets(results))
    print()
    print(table(results))


if __name__ == "__main__":
    main()
