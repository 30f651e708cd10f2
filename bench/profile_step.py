"""Where a decode step's time goes on the GPU: the engine's wall time per step against the GPU time of its graph,
the host's share of a step, and the kernels of one step.

    python bench/profile_step.py --preset llama-3.2-1b --batch 1 --json bench/results/profile-step.json

Wall ms/step is the median over a long generation (ignore_eos) through LLMEngine.step, overlap and graphs on.
GPU ms/replay is the step's graphs (forward, then draw) replayed back to back with nothing else, between CUDA
events. Host ms are the engine's own phases (schedule, launch, wait for the previous step's tokens, record them)
per step. The kernel table is torch.profiler's CUDA time per kernel name over replays of the graphs.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import time

import torch

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.sampling_params import SamplingParams


def timed(phases: dict[str, list[float]], name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name].append((time.perf_counter() - start) * 1e3)
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()
    engine = LLMEngine(EngineConfig(model=args.preset, load_format="dummy", device="cuda", max_model_len=4096))
    runner, scheduler = engine.runner, engine.scheduler
    phases: dict[str, list[float]] = collections.defaultdict(list)
    scheduler.schedule = timed(phases, "schedule", scheduler.schedule)
    scheduler.postprocess = timed(phases, "record", scheduler.postprocess)
    runner.launch = timed(phases, "launch", runner.launch)
    runner.collect = timed(phases, "wait", runner.collect)
    results = []
    for batch in args.batch:
        for rid in range(batch):
            engine.add_request(batch * 1000 + rid, list(range(10, 42)),
                               SamplingParams(temperature=0.0, max_tokens=args.steps, ignore_eos=True))
        walls = []
        phases.clear()
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            walls.append((time.perf_counter() - start) * 1e3)
        steady = slice(10, -10)   # past the prefill and the tail
        row = dict(preset=args.preset, batch=batch, wall_ms=statistics.median(walls[steady]),
                   **{f"{k}_ms": statistics.median(v[steady]) for k, v in phases.items()})

        graphs = runner.graphs
        bucket = graphs.bucket(batch)
        forward, draw = graphs.graphs[bucket], graphs.draws[bucket]
        for _ in range(5):
            forward.replay()
            draw.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(100):
            forward.replay()
            draw.replay()
        end.record()
        end.synchronize()
        row["gpu_ms_per_replay"] = start.elapsed_time(end) / 100

        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                forward.replay()
                draw.replay()
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.count >= 10]
        row["kernels_per_step"] = sum(e.count for e in kernels) / 10
        row["top_kernels"] = sorted(((e.key[:70], e.count // 10, e.device_time_total / 10 / 1e3) for e in kernels),
                                    key=lambda k: -k[2])[:12]
        results.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), results=results), f, indent=1)
    for row in results:
        print(f"\n{args.preset} batch {row['batch']}: {row['kernels_per_step']:.0f} kernels a step")
        print(f"{'kernel':<72}{'per step':>9}{'ms':>8}")
        for name, count, ms in row["top_kernels"]:
            print(f"{name:<72}{count:>9}{ms:>8.3f}")
    print(f"\n{'preset':<14}{'batch':>6}{'wall ms':>9}{'gpu ms':>8}{'schedule':>9}{'launch':>8}{'wait':>8}{'record':>8}")
    for r in results:
        print(f"{r['preset']:<14}{r['batch']:>6}{r['wall_ms']:>9.3f}{r['gpu_ms_per_replay']:>8.3f}"
              f"{r.get('schedule_ms', 0):>9.3f}{r.get('launch_ms', 0):>8.3f}{r.get('wait_ms', 0):>8.3f}"
              f"{r.get('record_ms', 0):>8.3f}")


if __name__ == "__main__":
    main()
