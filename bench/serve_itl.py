"""Served inter-token latency against the engine's own decode step, side by side, on one machine.

Does the process pipeline (API server, tokenizer, scheduler loop, detokenizer, SSE) keep what the engine wins?
For each number of concurrent streams: `minisrv serve` streams to bench/serving.py (completions, prompts of
--input-len tokens, --output-len tokens each, ignore_eos, logprobs 1 so that each of a dummy model's byte tokens
makes its own chunk), and the median gap between a stream's chunks (ITL) is compared with the median step of
the same engine in-process (LLMEngine.step, same model and settings, same batch and lengths, logprobs 1).

    python bench/serve_itl.py --model llama-3.2-1b --load-format dummy --json bench/results/serve-itl-h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import machine

BENCH = Path(__file__).resolve().parent


def wait_ready(url: str, timeout_s: float, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"the server was not ready within {timeout_s} s")


def served_itl(args, streams: int, port: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(BENCH / "serving.py"), "--base-url", f"http://127.0.0.1:{port}",
                        "--tokenizer", args.model, "--random-input-len", str(args.input_len),
                        "--random-output-len", str(args.output_len), "--ignore-eos", "--logprobs", "1",
                        "--max-concurrency", str(streams), "--num-prompts", str(max(8, 3 * streams)),
                        "--num-warmups", "2", "--no-progress", "--json", out.name], check=True)
        return json.loads(Path(out.name).read_text())


def engine_step_ms(engine, streams: int, args) -> float:
    """Median wall time of LLMEngine.step while `streams` requests decode (prefill and tail left out)."""
    from minisrv.sampling_params import SamplingParams

    rng = random.Random(streams)
    vocab = engine.loaded.model_config.vocab_size
    first = time.monotonic_ns()
    for i in range(streams):
        engine.add_request(first + i, [rng.randrange(256) for _ in range(args.input_len)],
                           SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, logprobs=1))
    assert vocab > 256
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        engine.step()
        steps.append((time.perf_counter() - start) * 1e3)
    return statistics.median(steps[5:-5])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--port", type=int, default=8917)
    ap.add_argument("--server-flags", default="", help="more `minisrv serve` flags, e.g. '--disable-cuda-graph'")
    ap.add_argument("--json")
    args = ap.parse_args()

    command = [sys.executable, "-m", "minisrv.cli", "serve", "--model", args.model, "--load-format",
               args.load_format, "--port", str(args.port), "--log-level", "warning", *args.server_flags.split()]
    server = subprocess.Popen(command, start_new_session=True)
    served = {}
    try:
        wait_ready(f"http://127.0.0.1:{args.port}", 600, server)
        for streams in args.streams:
            served[streams] = served_itl(args, streams, args.port)
    finally:
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)

    from minisrv.cli import build_parser, server_config
    from minisrv.engine.llm_engine import LLMEngine

    flags = ["serve", "--model", args.model, "--load-format", args.load_format, *args.server_flags.split()]
    engine = LLMEngine(server_config(build_parser().parse_args(flags)).engine)   # what the server ran
    rows = []
    for streams in args.streams:
        step = engine_step_ms(engine, streams, args)
        figures = served[streams]
        rows.append(dict(streams=streams, served_median_itl_ms=figures["median_itl_ms"],
                         served_p99_itl_ms=figures["p99_itl_ms"], engine_step_ms=step,
                         ratio=figures["median_itl_ms"] / step, failed=figures["failed"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "model": args.model, "server_flags": args.server_flags,
                       "input_len": args.input_len, "output_len": args.output_len, "results": rows}, f, indent=1)
    print(f"\n{args.model} ({args.load_format}) {args.server_flags}: {args.input_len} in, {args.output_len} out")
    print(f"{'streams':>8}{'served ITL p50':>16}{'p99':>8}{'engine step':>13}{'ratio':>8}{'failed':>8}")
    for r in rows:
        print(f"{r['streams']:>8}{r['served_median_itl_ms']:>13.2f} ms{r['served_p99_itl_ms']:>8.2f}"
              f"{r['engine_step_ms']:>10.2f} ms{r['ratio']:>8.2f}{r['failed']:>8}")


if __name__ == "__main__":
    main()
