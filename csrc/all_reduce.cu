// One-shot all-reduce (sum) over CUDA IPC peer memory, for the small messages of decode steps.
//
// A decode step of a tensor-parallel model runs two all-reduces per layer of a few KB to a few MB each; NCCL
// spends ~12 us on one, mostly protocol and synchronization, not bytes. Here each rank copies its part of the
// message into its own staging buffer, the ranks meet at one flag barrier, and every rank reads all WORLD
// staging buffers over NVLink and sums them: one kernel, one barrier, each rank reading (WORLD - 1) x the message.
// Above a few MB the reads cost more than they save (a two-shot reduce-scatter + all-gather would win there).
//
// Memory (minisrv/kernels/all_reduce.py allocates it, one IPC-shared allocation per buffer and rank):
// - staging: [blocks][2][slot_bytes]. Block b of every launch uses only its own slot b, half (epoch & 1). Slots
//   belong to blocks, not to element offsets, because launches of different sizes have different grids and so
//   partition the message differently: an offset layout would let block b of the next launch overwrite bytes a
//   peer's block b' of this launch is still reading. The host sizes a slot for the largest range a block gets.
// - flags: [MAX_BLOCKS][MAX_RANKS] u32. Rank r's block b stores its epoch into slot [b][r] of every peer's flags.
// - epochs: [MAX_BLOCKS] u32 in this rank's own memory: how many launches have run block b. Every rank launches
//   the same sequence of grids, so block b's epoch is the same number on every rank.
//
// Why one barrier per call is enough (no second barrier before returning): a block rewrites half p of its slot
// two of its epochs later. Its epoch in between passed the barrier, so every peer's block b had started that
// launch, so every peer had finished the launch before it (stream order), the one that read half p.
// Requirements that follow: every rank launches the same all-reduces (sizes, order) on one stream each, and the
// grid is small enough for all its blocks to be resident (a spinning block never waits on a block of its own
// rank, only on the same block of peers, but a peer's block b must get an SM eventually).
//
// Every rank sums the WORLD buffers in rank order, so all ranks hold the bit-identical result (the followers of
// minisrv/runtime/tensor_parallel.py compare digests of the step's results).
#include "common.cuh"

constexpr int MAX_RANKS = 8;
constexpr int MAX_BLOCKS = 64;   // flags and epochs are sized for this many blocks
constexpr int AR_THREADS = 512;  // minisrv/kernels/all_reduce.py THREADS

// Passed by value (a ctypes array of 8 u64 on the host): one pointer per rank, peers' mapped through IPC.
struct RankPtrs {
    u64 ptr[MAX_RANKS];
};

// ptr[i] for a run-time i as a chain of selects: indexing the parameter with a variable copies the struct to
// the local-memory stack first. The `mov` hides where each value came from, or the compiler folds the selects
// back into that indexed load.
template <int WORLD> __device__ __forceinline__ u64 pick(const RankPtrs& p, int i) {
    u64 v = 0;
#pragma unroll
    for (int r = 0; r < WORLD; ++r) {
        u64 pr;
        asm("mov.b64 %0, %1;" : "=l"(pr) : "l"(p.ptr[r]));
        v = i == r ? pr : v;
    }
    return v;
}

// 16 bytes as VEC elements of T, for the explicit 128-bit PTX accesses below.
template <typename T> union Pack {
    u32 w[4];
    T v[16 / sizeof(T)];
};

// Plain 16-byte load and store of this rank's own memory (x, its staging slot), volatile with a memory clobber so
// that the compiler keeps them on their side of the flag barrier.
__device__ __forceinline__ void ld_v4(const void* p, u32 (&w)[4]) {
    asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p) : "memory");
}
__device__ __forceinline__ void st_v4(void* p, const u32 (&w)[4]) {
    asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};"
                 :: "l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
}

// Staging reads (peers' memory over NVLink, and our own) cached at L2 only: the barrier's acquire already makes
// the peers' writes visible, .cg also keeps a stale L1 line from ever being a question. `volatile` + "memory"
// keep the compiler from hoisting the loads above the barrier.
__device__ __forceinline__ void ld_cg_v4(const void* p, u32 (&w)[4]) {
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "l"(p) : "memory");
}
template <typename T> __device__ __forceinline__ T ld_cg(const T* p);
template <> __device__ __forceinline__ float ld_cg<float>(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
}
template <> __device__ __forceinline__ bf16_t ld_cg<bf16_t>(const bf16_t* p) {
    u16 h;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(h) : "l"(p) : "memory");
    return bf16_t{h};
}
template <> __device__ __forceinline__ f16_t ld_cg<f16_t>(const f16_t* p) {
    u16 h;
    asm volatile("ld.global.cg.u16 %0, [%1];" : "=h"(h) : "l"(p) : "memory");
    return f16_t{h};
}

// The flag handshake at system scope: the peer that polls is another GPU.
__device__ __forceinline__ void st_release_sys(u32* p, u32 v) {
    asm volatile("st.release.sys.global.u32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ u32 ld_acquire_sys(const u32* p) {
    u32 v;
    asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// x [n] (this rank's part of the sum) <- the sum over ranks, in place. Grid: any number of blocks up to the
// host's block count (<= MAX_BLOCKS), the same on every rank for a given n; AR_THREADS threads.
template <typename T, int WORLD>
__global__ void __launch_bounds__(AR_THREADS)
one_shot_all_reduce(RankPtrs staging, RankPtrs flags, int rank, T* x, i64 n, i64 slot_bytes, u32* epochs) {
    constexpr int VEC = 16 / sizeof(T);
    if (gridDim.x > MAX_BLOCKS) asm volatile("trap;");   // the flags and epochs end there: fail loudly instead
    const int b = blockIdx.x, tid = threadIdx.x;
    // Contiguous runs of whole vectors, so every block but the last starts and ends on a 16-byte boundary.
    const i64 per_block = ((n + VEC - 1) / VEC + gridDim.x - 1) / gridDim.x * VEC;
    const i64 start = b * per_block;
    const i64 count = start < n ? (n - start < per_block ? n - start : per_block) : 0;   // 0: barrier only
    const i64 full = count / VEC;
    const int tail = (int)(count - full * VEC);

    // Every thread reads the epoch (one broadcast load); thread 0 stores it back only after the barrier below,
    // when no thread can still be reading the old value.
    const u32 epoch = epochs[b] + 1;
    const i64 half_offset = ((i64)b * 2 + (epoch & 1)) * slot_bytes;
    char* const mine = reinterpret_cast<char*>(pick<WORLD>(staging, rank)) + half_offset;
    T* const xs = x + start;

    for (i64 i = tid; i < full; i += blockDim.x) {
        u32 w[4];
        ld_v4(xs + i * VEC, w);
        st_v4(mine + i * 16, w);
    }
    if (tid < tail) reinterpret_cast<T*>(mine)[full * VEC + tid] = xs[full * VEC + tid];
    __syncthreads();
    if (tid == 0) epochs[b] = epoch;

    // Thread p < WORLD signals peer p and waits for it, so the WORLD - 1 round trips overlap. The block barrier
    // above orders every thread's staging writes before this thread's fence, and the fence is cumulative, so the
    // release store of the flag publishes the whole block's writes, not only this thread's. (By the PTX model the
    // release store alone should suffice; the explicit fence is the pattern of CUDA's own grid sync and costs one
    // instruction per peer per call.) On the reading side the acquire, then the block barrier, orders the
    // peers' writes before every thread's staging loads.
    if (tid < WORLD && tid != rank) {
        const int peer = tid;
        asm volatile("fence.sc.sys;" ::: "memory");
        st_release_sys(reinterpret_cast<u32*>(pick<WORLD>(flags, peer)) + b * MAX_RANKS + rank, epoch);
        const u32* ready = reinterpret_cast<const u32*>(pick<WORLD>(flags, rank)) + b * MAX_RANKS + peer;
        // A peer is at most one epoch ahead (its next launch waits on ours), so the difference never overflows
        // an int and the comparison survives the u32 wrap (2^32 calls of one block: hours at decode rates).
        while ((int)(ld_acquire_sys(ready) - epoch) < 0) {
        }
    }
    __syncthreads();

    const char* src[WORLD];
#pragma unroll
    for (int r = 0; r < WORLD; ++r) src[r] = reinterpret_cast<const char*>(staging.ptr[r]) + half_offset;
    for (i64 i = tid; i < full; i += blockDim.x) {
        Pack<T> in[WORLD];
#pragma unroll
        for (int r = 0; r < WORLD; ++r) ld_cg_v4(src[r] + i * 16, in[r].w);   // all loads in flight, then sum
        float acc[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] = to_float(in[0].v[j]);
#pragma unroll
        for (int r = 1; r < WORLD; ++r) {
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += to_float(in[r].v[j]);
        }
        Pack<T> out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(acc[j]);
        st_v4(xs + i * VEC, out.w);
    }
    if (tid < tail) {
        const i64 k = full * VEC + tid;
        float acc = to_float(ld_cg(reinterpret_cast<const T*>(src[0]) + k));
#pragma unroll
        for (int r = 1; r < WORLD; ++r) acc += to_float(ld_cg(reinterpret_cast<const T*>(src[r]) + k));
        xs[k] = from_float<T>(acc);
    }
}
