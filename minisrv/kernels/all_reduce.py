"""A one-shot all-reduce (sum) over CUDA IPC peer memory for the small all-reduces of decode steps.

A decode step of a tensor-parallel model ends every attention and MLP block in an all-reduce of a few KB to a
few MB; NCCL spends about 12 us on each whatever the size, which at two per layer is much of a small model's
step. csrc/all_reduce.cu does it in one kernel and one flag barrier: every rank copies its tensor into its own
staging buffer, signals every peer, and reads all the ranks' buffers over NVLink to sum them (the kernel's
header explains why one barrier per call is safe). Each rank maps its peers' staging and flag buffers through
CUDA IPC once, at construction; after that a call is one launch with arguments that depend only on the tensor,
so it can be captured in a CUDA graph, and it never synchronizes with the host.

Rules for callers: construction and close() are collective (every rank of the default process group, which
must be initialized, with this process's GPU current); every rank calls all_reduce on tensors of the same
shapes and dtypes in the same order, on one stream (or stream-ordered), and only on tensors `supports` accepts;
every rank passes the same max_bytes and max_blocks; ranks are the GPUs of one host (rank r on GPU first + r,
as minisrv.layers.parallel.init_tensor_parallel binds them).
"""
from __future__ import annotations

import ctypes

import torch
import torch.distributed as dist

from minisrv.kernels.cuda import TYPE_NAMES, _i32, _i64, _launch, _ptr, unsupported

FILE = "all_reduce.cu"
WORLD_SIZES = (2, 4, 8)       # the kernel's WORLD instantiations
MAX_RANKS = 8                 # csrc/all_reduce.cu MAX_RANKS: the pointer tables' length
MAX_BLOCKS = 64               # csrc/all_reduce.cu MAX_BLOCKS: the flag and epoch arrays' blocks
THREADS = 512                 # csrc/all_reduce.cu AR_THREADS
# Blocks of the largest launch: enough 16-byte loads in flight to cover NVLink's latency on a 2 MB message,
# few enough that every block is resident at once (the barrier spins) and the flag traffic stays small.
DEFAULT_BLOCKS = 36
FLAG_BYTES = MAX_BLOCKS * MAX_RANKS * 4

# csrc/all_reduce.cu RankPtrs, passed by value: one device pointer per rank, zero past the world size.
_RankPtrs = ctypes.c_uint64 * MAX_RANKS


class CustomAllReduce:
    """In-place sum of a tensor over the ranks of the default process group, through peer memory."""

    def __init__(self, rank: int, world_size: int, device: torch.device, max_bytes: int = 8 << 20,
                 max_blocks: int = DEFAULT_BLOCKS) -> None:
        device = torch.device(device)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        problem = self.available(world_size, device.index - rank)   # rank r on GPU first + r
        if problem:
            raise RuntimeError(f"custom all-reduce unavailable: {problem}")
        if not 1 <= max_blocks <= MAX_BLOCKS:
            raise ValueError(f"max_blocks {max_blocks}: must be 1..{MAX_BLOCKS} (the kernel's flag array)")
        import cupy

        runtime = cupy.cuda.runtime
        self.rank, self.world_size, self.device = rank, world_size, device
        self.max_bytes, self.max_blocks = max_bytes, max_blocks
        # A block's slot holds the largest run of the message a block gets: a launch takes one block per THREADS
        # vectors of 16 bytes up to max_blocks, then longer runs (the kernel's partition).
        vectors = -(-max_bytes // 16)
        self.slot_bytes = 16 * max(THREADS, -(-vectors // max_blocks))
        self._owned: list[int] = []     # our allocations, freed by close()
        self._opened: list[int] = []    # peers' allocations mapped here, unmapped by close()
        self._runtime = runtime
        try:
            with cupy.cuda.Device(device.index):
                # One cudaMalloc per buffer: an IPC handle names a whole allocation, so a peer maps exactly it.
                staging = runtime.malloc(max_blocks * 2 * self.slot_bytes)
                self._owned.append(staging)
                flags = runtime.malloc(FLAG_BYTES)
                self._owned.append(flags)
                runtime.memset(flags, 0, FLAG_BYTES)
                mine = (runtime.ipcGetMemHandle(staging), runtime.ipcGetMemHandle(flags), self.slot_bytes)
            # Only this rank's blocks touch their epochs, so they live in ordinary local memory.
            self._epochs = torch.zeros(MAX_BLOCKS, dtype=torch.int32, device=device)
            gathered: list[tuple[bytes, bytes, int] | None] = [None] * world_size
            dist.all_gather_object(gathered, mine)
            peers = [peer for peer in gathered if peer is not None]
            # The kernel finds a block's slot in a peer's buffer with this rank's slot size: it must be one size.
            if {slot for _, _, slot in peers} != {self.slot_bytes}:
                raise ValueError("custom all-reduce: ranks were built with different max_bytes or max_blocks")
            staging_ptrs, flag_ptrs = [0] * MAX_RANKS, [0] * MAX_RANKS
            with cupy.cuda.Device(device.index):
                for r, (staging_handle, flags_handle, _) in enumerate(peers):
                    if r == rank:
                        staging_ptrs[r], flag_ptrs[r] = staging, flags
                    else:
                        staging_ptrs[r], flag_ptrs[r] = self._open(staging_handle), self._open(flags_handle)
            self._staging = _RankPtrs(*staging_ptrs)
            self._flags = _RankPtrs(*flag_ptrs)
            # The zeroed flags and epochs must be in place on every rank before any rank's first call stores
            # into a peer's flags: finish them here, then meet.
            torch.cuda.synchronize(device)
            dist.barrier()
        except BaseException:
            self._release()
            raise

    @staticmethod
    def available(world_size: int, first_gpu: int = 0) -> str | None:
        """Why the custom all-reduce cannot run over `world_size` ranks on GPUs first_gpu.. here, or None."""
        if world_size not in WORLD_SIZES:
            return f"{world_size} ranks: the kernel is built for {', '.join(map(str, WORLD_SIZES))}"
        problem = unsupported()
        if problem:
            return problem
        count = torch.cuda.device_count()
        gpus = range(first_gpu, first_gpu + world_size)
        if first_gpu < 0 or count < gpus.stop:
            return (f"{world_size} ranks from GPU {first_gpu} but {count} visible GPUs: IPC peer memory needs every "
                    "rank on one host")
        for i in gpus:
            for j in gpus:
                if i != j and not torch.cuda.can_device_access_peer(i, j):
                    return f"GPU {i} cannot access GPU {j}'s memory directly (no peer-to-peer path)"
        return None

    def supports(self, x: torch.Tensor) -> bool:
        """Whether all_reduce can take `x`: on this rank's GPU, contiguous, a kernel dtype, at most max_bytes,
        whole and aligned 16-byte vectors (the kernel's accesses)."""
        nbytes = x.numel() * x.element_size()
        return (x.device == self.device and x.dtype in TYPE_NAMES and x.is_contiguous()
                and nbytes <= self.max_bytes and nbytes % 16 == 0 and x.data_ptr() % 16 == 0)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x <- the sum of x over the ranks, in place, on the current stream; returns x. The sum runs in float
        in rank order, so every rank gets the same bits."""
        if not self.supports(x):
            # Past max_bytes the kernel would write beyond its staging slots: refuse rather than corrupt.
            raise ValueError(f"custom all-reduce cannot take a {x.dtype} tensor of {x.numel()} elements on "
                             f"{x.device} (contiguous {x.is_contiguous()}, max {self.max_bytes} bytes)")
        n = x.numel()
        if n:
            # Same n, same grid on every rank: the kernel's partition and the blocks' epochs depend on it.
            blocks = min(self.max_blocks, -(-(n * x.element_size()) // (16 * THREADS)))
            _launch(FILE, f"one_shot_all_reduce<{TYPE_NAMES[x.dtype]}, {self.world_size}>", (blocks,), (THREADS,),
                    self._staging, self._flags, _i32(self.rank), _ptr(x), _i64(n), _i64(self.slot_bytes),
                    _ptr(self._epochs))
        return x

    def close(self, peers_gone: bool = False) -> None:
        """Unmap the peers' buffers and free ours. Collective: a peer may still be reading our staging buffer
        after our last call returned, so every rank finishes its calls and meets the others first, unless
        the peers have exited already (`peers_gone`)."""
        if not self._owned and not self._opened:
            return
        torch.cuda.synchronize(self.device)
        if dist.is_initialized() and not peers_gone:
            dist.barrier()
        self._release()

    def _open(self, handle: bytes) -> int:
        """Map a peer's allocation here (enabling peer access to its GPU on first use)."""
        ptr = self._runtime.ipcOpenMemHandle(handle, self._runtime.cudaIpcMemLazyEnablePeerAccess)
        self._opened.append(ptr)
        return ptr

    def _release(self) -> None:
        import cupy

        with cupy.cuda.Device(self.device.index):
            for ptr in self._opened:
                self._runtime.ipcCloseMemHandle(ptr)
            for ptr in self._owned:
                self._runtime.free(ptr)
        self._opened, self._owned = [], []
