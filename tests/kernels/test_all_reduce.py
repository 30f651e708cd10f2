"""The custom all-reduce (minisrv/kernels/all_reduce.py, csrc/all_reduce.cu) against NCCL's, over two GPUs:
every size class of a decode step, bursts of calls with no host sync between them (the double-buffered staging
and per-block epochs: a rank that reuses a staging half too early shows as a wrong sum), and calls captured in a
CUDA graph and replayed with new data, eager calls in between. Each rank also checks that both ranks hold the
same bits.

Run on a GPU machine: `python -m pytest -m cuda tests/kernels/test_all_reduce.py`.
"""
from __future__ import annotations

import multiprocessing
import queue
import traceback

import pytest
import torch

from tests.server.live_server import free_port

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                                   reason="needs 2 CUDA GPUs")]
WORLD = 2
# Rows x hidden: one decode token to a 256-sequence batch of a 4096-wide model (8 KB to 2 MB in bf16, twice
# that in float32), and a size that is whole 16-byte vectors but no multiple of the block's work.
SIZES = [(1, 4096), (7, 4096), (64, 4096), (256, 4096), (3, 1000)]
DTYPES = [torch.bfloat16, torch.float32]
# NCCL sums two ranks in the storage type, the kernel in float then rounds once: one bf16 rounding apart at
# most; in float32 both compute the same single addition.
TOLERANCE = {torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}
BURST = 50
TIMEOUT_S = 300.0   # both ranks compile the kernels (NVRTC) on a cold cache


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, rank: int, seed: int) -> torch.Tensor:
    """Random data differing by rank and by seed (never zeros, which a stale or missed read would also sum to)."""
    gen = torch.Generator(device="cuda").manual_seed(seed * WORLD + rank)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype)


def _nccl(x: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    ref = x.clone()
    dist.all_reduce(ref)
    return ref


def _check(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    import torch.distributed as dist

    torch.testing.assert_close(out, ref, **TOLERANCE[out.dtype], msg=lambda m: f"{what}: {m}")
    parts = [torch.empty_like(out) for _ in range(WORLD)]
    dist.all_gather(parts, out)
    assert all(torch.equal(parts[0], p) for p in parts), f"{what}: the ranks' results differ"


def _exercise(car, rank: int) -> None:
    # One call of each size and dtype, in place.
    for dtype in DTYPES:
        for shape in SIZES:
            x = _inputs(shape, dtype, rank, seed=1)
            ref = _nccl(x)
            assert car.supports(x)
            out = car.all_reduce(x)
            assert out.data_ptr() == x.data_ptr()
            _check(out, ref, f"{dtype} {shape}")

    # Bursts with no host sync: one size (every block alternates halves), then mixed sizes and dtypes (grids
    # change from call to call, so blocks' epochs drift apart). Rank 1 starts late, so rank 0's calls wait at
    # the barrier and queue up behind it.
    mixed = [(SIZES[i % len(SIZES)], DTYPES[i // len(SIZES) % len(DTYPES)]) for i in range(BURST)]
    for burst, cases in (("same size", [((64, 4096), torch.bfloat16)] * BURST), ("mixed", mixed)):
        xs = [_inputs(shape, dtype, rank, seed=100 + i) for i, (shape, dtype) in enumerate(cases)]
        refs = [_nccl(x) for x in xs]
        torch.cuda.synchronize()
        if rank == 1:
            torch.cuda._sleep(50_000_000)   # tens of milliseconds of GPU time
        for x in xs:
            car.all_reduce(x)
        torch.cuda.synchronize()
        for i, (x, ref) in enumerate(zip(xs, refs)):
            _check(x, ref, f"{burst} burst, call {i} ({x.dtype} {tuple(x.shape)})")

    # Three calls captured in a graph, replayed with fresh data, an eager call between replays (the epochs
    # keep counting across both).
    static = [torch.empty(7, 4096, dtype=torch.bfloat16, device="cuda"),
              torch.empty(64, 4096, dtype=torch.bfloat16, device="cuda"),
              torch.empty(3, 1000, dtype=torch.float32, device="cuda")]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for t in static:
            car.all_reduce(t)
    for replay in range(4):
        fresh = [_inputs(tuple(t.shape), t.dtype, rank, seed=1000 + 10 * replay + i) for i, t in enumerate(static)]
        refs = [_nccl(f) for f in fresh]
        for t, f in zip(static, fresh):
            t.copy_(f)
        graph.replay()
        eager = _inputs((256, 4096), torch.bfloat16, rank, seed=2000 + replay)
        eager_ref = _nccl(eager)
        car.all_reduce(eager)
        torch.cuda.synchronize()
        for i, (t, ref) in enumerate(zip(static, refs)):
            _check(t, ref, f"replay {replay}, captured call {i}")
        _check(eager, eager_ref, f"eager call after replay {replay}")


def _worker(rank: int, init_method: str, results: multiprocessing.Queue) -> None:
    """One rank: join the group, build the all-reduce, run the checks, report None or the traceback."""
    import torch.distributed as dist

    from minisrv.kernels.all_reduce import CustomAllReduce
    from minisrv.layers.parallel import init_tensor_parallel

    try:
        init_tensor_parallel(rank, WORLD, init_method, "cuda")
        car = CustomAllReduce(rank, WORLD, torch.device("cuda", rank))
        _exercise(car, rank)
    except BaseException:
        # Report before anything collective: the other rank may be stuck, and the parent kills both.
        results.put((rank, traceback.format_exc()))
        return
    results.put((rank, None))
    car.close()
    dist.destroy_process_group()


def test_custom_all_reduce_matches_nccl() -> None:
    from minisrv.kernels.all_reduce import CustomAllReduce

    problem = CustomAllReduce.available(WORLD)
    if problem:
        pytest.skip(problem)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_worker, args=(rank, init_method, results)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    reports: dict[int, str | None] = {}
    try:
        for _ in procs:
            rank, error = results.get(timeout=TIMEOUT_S)
            reports[rank] = error
            if error is not None:
                break   # the other rank may wait forever on this one
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=30 if len(reports) == WORLD else 0)
            if p.is_alive():
                p.kill()
                p.join()
    for rank, error in sorted(reports.items()):
        assert error is None, f"rank {rank} failed:\n{error}"
    assert sorted(reports) == list(range(WORLD)), f"only ranks {sorted(reports)} reported within {TIMEOUT_S} s"
