"""Tensor parallelism on one host: decode ms/step of a dummy preset at tp=1 and tp=N, each against its floor.

For each tensor-parallel size, one process per rank (spawned here) loads its part of the model and runs the
same requests through its own engine in lockstep, as the server's ranks do (offline_cuda's decode_ms, greedy:
every rank schedules alike; their request ids differ, which no scheduling decision reads). Decode ms/step =
(time of 129 output tokens - time of 1) / 128 at each batch size, CUDA graphs and overlap on. The floor is a rank's weight bytes over the device copy bandwidth measured in the
same run. The collectives' share: the step's own all-reduces (2 per layer) and logits all-gather, captured in
one CUDA graph on the same ranks and shapes, timed alone, over the step time.

    python bench/tp.py --preset llama-3.1-8b --tp 1 2 --batches 1 64 --json bench/results/tp-h200.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics

import torch
from kernels import copy_bandwidth
from machine import machine
from offline_cuda import decode_ms, weight_bytes

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.layers.parallel import TensorParallel, init_tensor_parallel
from minisrv.models.source import resolve_source
from minisrv.runtime.tensor_parallel import TPGroup, free_tcp_port


def collectives_ms(tp: TensorParallel, batch: int, hidden: int, vocab: int, layers: int) -> float:
    """One decode step's collectives alone, replayed from a CUDA graph as the step replays them."""
    x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
    logits = torch.randn(batch, tp.vocab(vocab)[1], dtype=torch.bfloat16, device="cuda")

    def step() -> None:
        for _ in range(2 * layers):
            tp.all_reduce(x)
        tp.all_gather_vocab(logits, vocab)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    times = []
    for _ in range(30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[5:])


def rank_main(rank: int, group: TPGroup, custom: bool, args: argparse.Namespace, results) -> None:
    config = EngineConfig(model=args.preset, load_format="dummy", tp_size=group.size, max_model_len=1024,
                          cuda_graph_max_bs=max(args.batches), custom_all_reduce=custom)
    tp = init_tensor_parallel(rank, group.size, group.init_method, "cuda", group.ranks_per_node, custom)
    engine = LLMEngine(config, resolve_source(config), tp=tp)
    model_config = engine.loaded.model_config
    rank_weight_bytes = weight_bytes(engine.loaded)
    rows = []
    for batch in args.batches:
        step = decode_ms(engine, batch, model_config.vocab_size, args.repeats)   # greedy: every rank draws alike
        comm = collectives_ms(tp, batch, model_config.hidden_size, model_config.vocab_size,
                              model_config.num_layers) if group.size > 1 else 0.0
        all_reduce = "one-shot" if tp.fast_all_reduce is not None else "nccl" if group.size > 1 else "-"
        rows.append(dict(tp=group.size, all_reduce=all_reduce, batch=batch, decode_ms=step, collectives_ms=comm))
    if rank == 0:
        bandwidth = copy_bandwidth(5)
        for row in rows:
            row.update(weight_gb_per_rank=rank_weight_bytes / 1e9, copy_gb_s=bandwidth,
                       floor_ms=rank_weight_bytes / (bandwidth * 1e9) * 1e3)
            row["floor_share"] = row["floor_ms"] / row["decode_ms"]
            row["collectives_share"] = row["collectives_ms"] / row["decode_ms"]
        results.put(rows)


def run_size(size: int, custom: bool, args: argparse.Namespace) -> list[dict]:
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    group = TPGroup(size, f"tcp://127.0.0.1:{free_tcp_port()}", size)
    ranks = [spawn.Process(target=rank_main, args=(rank, group, custom, args, results)) for rank in range(size)]
    for process in ranks:
        process.start()
    rows = results.get(timeout=args.timeout)
    for process in ranks:
        process.join(60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama-3.1-8b")
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=480)
    parser.add_argument("--json", help="write the rows and the machine here")
    args = parser.parse_args()
    runs = [(size, custom) for size in args.tp for custom in ((True, False) if size > 1 else (False,))]
    rows = [row for size, custom in runs for row in run_size(size, custom, args)]
    base = {row["batch"]: row["decode_ms"] for row in rows if row["tp"] == 1}
    for row in rows:
        if row["batch"] in base:
            row["vs_tp1"] = row["decode_ms"] / base[row["batch"]]
    if args.json:
        info = {**machine(), "gpu": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count()}
        with open(args.json, "w") as f:
            json.dump({"machine": info, "preset": args.preset, "results": rows}, f, indent=1)
    print(f"\n{args.preset}, bfloat16, CUDA graphs + overlap, {torch.cuda.get_device_name(0)}")
    print("| tp | all-reduce | batch | decode ms/step | floor ms (weights/rank / copy bw) | floor share | "
          "collectives ms | collectives share | vs tp=1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['all_reduce']} | {r['batch']} | {r['decode_ms']:.3f} | {r['floor_ms']:.3f} | {r['floor_share']:.0%} | "
              f"{r['collectives_ms']:.3f} | {r['collectives_share']:.0%} | {r.get('vs_tp1', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
