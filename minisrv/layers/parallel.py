"""Tensor parallelism: which slice of each layer a rank holds, and the two collectives the model needs.

Megatron's split, as vLLM and SGLang run it: q/k/v and gate/up are split by output rows (whole heads, whole
GQA groups), o_proj and down_proj by input columns, so each block ends in one all-reduce; the embedding and
the LM head are split by vocabulary rows (a lookup masked to the rank's rows and an all-reduce; the logits
all-gathered). Splits are as even as the counts allow, so a model whose head count the rank count does not
divide (SmolLM2-135M: 9 heads, 3 KV heads) still splits, by whole KV groups. Collectives go through
torch.distributed's default group (NCCL on CUDA, gloo on the CPU), initialized by `init_tensor_parallel`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# NVLink multicast stays off on the lent GPU machines (their KINDS.md); children inherit the environment.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def partition(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, count) of part `index` when `total` items split into `parts` runs differing by at most one."""
    base, extra = divmod(total, parts)
    return index * base + min(index, extra), base + (index < extra)


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among `size` ranks; size 1 is the plain model (no collective ever runs)."""

    rank: int = 0
    size: int = 1
    # Ranks over several hosts: a gloo group of rank 0 and the ranks on the other hosts, which cannot read its
    # shared-memory ring and get its records through this group instead (minisrv/runtime/tensor_parallel.py).
    remote_group: Any = field(default=None, compare=False)
    # The one-shot all-reduce over peer memory (minisrv/kernels/all_reduce.py) where it can run: the small
    # all-reduces of decode steps in a few microseconds instead of NCCL's ~12.
    fast_all_reduce: Any = field(default=None, compare=False)

    def heads(self, num_heads: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        """(first q head, q heads, first kv head, kv heads) of this rank. With at least as many KV heads as
        ranks, each rank takes whole GQA groups; with fewer, q heads split evenly and each rank keeps the one
        KV head its q heads read (a replica, as vLLM does)."""
        if self.size == 1:
            return 0, num_heads, 0, num_kv_heads
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.size:
            kv_start, kv_count = partition(num_kv_heads, self.size, self.rank)
            return kv_start * group, kv_count * group, kv_start, kv_count
        if self.size % num_kv_heads or num_heads % self.size:
            raise ValueError(f"tp_size (--tp-size) {self.size}: the model has {num_kv_heads} KV heads and "
                             f"{num_heads} heads; with fewer KV heads than ranks both must divide evenly")
        q_count = num_heads // self.size
        q_start = self.rank * q_count
        return q_start, q_count, q_start // group, 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """(first row, rows) of this rank's vocabulary slice, every rank padded to the same row count (the
        all-gather needs equal parts): the last rank's padding rows are zero and their logits cut off."""
        per_rank = -(-vocab_size // self.size)
        return self.rank * per_rank, per_rank

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if self.fast_all_reduce is not None and self.fast_all_reduce.supports(x):
            return self.fast_all_reduce.all_reduce(x)
        dist.all_reduce(x)
        return x

    def all_gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """[rows, vocab/size] logits on each rank -> [rows, vocab_size] on every rank."""
        if self.size == 1:
            return local
        parts = torch.empty((self.size, *local.shape), dtype=local.dtype, device=local.device)
        if dist.get_backend() == "nccl":
            dist.all_gather_into_tensor(parts, local.contiguous())
        else:   # gloo has no all_gather_into_tensor
            dist.all_gather(list(parts.unbind(0)), local.contiguous())
        return parts.permute(1, 0, 2).reshape(local.shape[0], -1)[:, :vocab_size]

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest `value` over the ranks (the KV pool: every rank's scheduler must hold the same pages)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def bind_gpu(index: int) -> None:
    """Make GPU `index` this process's device, for PyTorch and for CuPy (which loads our kernels)."""
    torch.cuda.set_device(index)
    try:
        import cupy

        cupy.cuda.Device(index).use()
    except ImportError:
        pass


def init_tensor_parallel(rank: int, size: int, init_method: str, device: str, ranks_per_node: int | None = None,
                         custom_all_reduce: bool = True, first_gpu: int = 0) -> TensorParallel:
    """Join the process group (NCCL on CUDA, gloo on the CPU) and, on CUDA, bind this process to its GPU: a
    node's ranks fill its visible GPUs in order from `first_gpu` (a data-parallel replica's first). Ranks on
    `size / ranks_per_node` hosts also make the gloo group rank 0 sends its records on."""
    if size == 1:
        return TensorParallel()
    ranks_per_node = ranks_per_node or size
    for name, value in NCCL_ENV.items():
        os.environ.setdefault(name, value)
    if device == "cuda":
        local = first_gpu + rank % ranks_per_node
        bind_gpu(local)
        dist.init_process_group("nccl", init_method=init_method, rank=rank, world_size=size,
                                device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=size)
    remote = None
    if ranks_per_node < size:   # every rank takes part in making a group, members or not
        remote = dist.new_group([0, *range(ranks_per_node, size)], backend="gloo")
    fast = None
    if device == "cuda" and custom_all_reduce and ranks_per_node == size:
        from minisrv.kernels.all_reduce import CustomAllReduce

        problem = CustomAllReduce.available(size, first_gpu)
        if problem is None:
            fast = CustomAllReduce(rank, size, torch.device("cuda", torch.cuda.current_device()))
        elif rank == 0:
            logger.info("all-reduce through NCCL only: %s", problem)
    return TensorParallel(rank, size, remote if rank == 0 or rank >= ranks_per_node else None, fast)
