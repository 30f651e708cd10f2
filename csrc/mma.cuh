// Tensor-core helpers of the attention kernels: mma.m16n8k16 with 16-bit inputs and float accumulators.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"), with gid = lane / 4 and tig = lane % 4:
//   A (16 x 16, row-major): register j holds row gid + 8 (j % 2), columns 8 (j / 2) + 2 tig, +1;
//   B (16 x 8, k x n):      register j holds k = 8 j + 2 tig, +1 of column n = gid;
//   C (16 x 8, float):      element j holds row gid + 8 (j / 2), column 2 tig + j % 2.
// So the C tiles of S = Q K^T for keys [16 s, 16 s + 16) are exactly the A operand of O += P V.
#pragma once
#include "common.cuh"

constexpr int PAD = 8;   // shared-memory row padding (16 bytes): conflict-free fragment loads

template <typename T> struct Mma;
template <> struct Mma<bf16_t> {
    __device__ static void run(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ static u32 pack(float lo, float hi) {   // lo -> bits 0..15 (the lower column)
        u32 r;
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};
template <> struct Mma<f16_t> {
    __device__ static void run(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ static u32 pack(float lo, float hi) {
        u32 r;
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
};

// S = Q K^T for a tile of KEYS keys whose K rows (D values, PAD after) are in shared memory: Q's A fragments
// are in registers (k-step kk covers head dimensions 16 kk .. 16 kk + 15); n-tile nt holds keys 8 nt .. 8 nt + 7.
template <typename T, int KEYS, int D>
__device__ __forceinline__ void qk_scores(float (&s)[KEYS / 8][4], const u32 (&qa)[D / 16][4],
                                          const u16 (*k_rows)[D + PAD], int gid, int tig) {
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt) {
#pragma unroll
        for (int j = 0; j < 4; ++j) s[nt][j] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const u32 b0 = *reinterpret_cast<const u32*>(&k_rows[nt * 8 + gid][kk * 16 + 2 * tig]);
            const u32 b1 = *reinterpret_cast<const u32*>(&k_rows[nt * 8 + gid][kk * 16 + 8 + 2 * tig]);
            Mma<T>::run(s[nt], qa[kk], b0, b1);
        }
    }
}

// The online-softmax step both attention kernels share, on a tile of KEYS keys: P = exp2(S - base) (S's C
// tiles in registers, base the running maximum of each of the thread's two rows), each row's sum added to l,
// and P packed as the A operand of O += P V (k-step ks covers n-tiles 2 ks and 2 ks + 1).
template <typename T, int KEYS>
__device__ __forceinline__ void softmax_to_a(const float (&s)[KEYS / 8][4], const float (&base)[2], float (&l)[2],
                                             u32 (&pa)[KEYS / 16][4]) {
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt) {
        float p[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            p[j] = exp2f(s[nt][j] - base[j >> 1]);
            l[j >> 1] += p[j];
        }
        pa[nt / 2][(nt & 1) * 2 + 0] = Mma<T>::pack(p[0], p[1]);
        pa[nt / 2][(nt & 1) * 2 + 1] = Mma<T>::pack(p[2], p[3]);
    }
}

// O += P V for a tile of KEYS keys whose V rows (D values, PAD after) are in shared memory. V's B fragment:
// keys 2 tig, 2 tig + 1 (and + 8) of column gid, two 16-bit loads per register.
template <typename T, int KEYS, int D>
__device__ __forceinline__ void accumulate_pv(float (&o)[D / 8][4], const u32 (&pa)[KEYS / 16][4],
                                              const u16 (*v_rows)[D + PAD], int gid, int tig) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int ks = 0; ks < KEYS / 16; ++ks) {
            const int key = ks * 16 + 2 * tig, d = dt * 8 + gid;
            const u32 b0 = v_rows[key][d] | (u32)v_rows[key + 1][d] << 16;
            const u32 b1 = v_rows[key + 8][d] | (u32)v_rows[key + 9][d] << 16;
            Mma<T>::run(o[dt], pa[ks], b0, b1);
        }
}

// Asynchronous 16-byte copies global -> shared (cp.async): no registers, many in flight; a source of 0 bytes
// writes zeros (positions past a sequence are never read).
__device__ __forceinline__ u32 shared_address(const void* p) {
    u32 address;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(address) : "l"(p));
    return address;
}
__device__ __forceinline__ void copy_async16(void* dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(shared_address(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int PENDING> __device__ __forceinline__ void copy_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

// An 8-bit KV cache (e4m3_t): its tiles are staged as bytes by the same cp.async pipeline, then widened into the
// 16-bit rows the tensor cores read. Not with cvt, whose conversions run at a fraction of the ALU rate (a first
// version with cvt took decode attention to 1.6-2.2x the time of a bfloat16 cache on an H200): each e4m3 value's
// exponent and mantissa bits are moved into the 16-bit type's fields, a magnitude off by the exponent biases'
// difference (2^120 for bfloat16, 2^8 for fp16) that one packed multiply corrects, exactly (subnormals included:
// e4m3's 3 mantissa bits fit either type). e4m3's NaN (S.1111.111) would read as 480; the cache holds none, since
// stores saturate.
template <typename T> struct Widen;
template <> struct Widen<bf16_t> {
    static constexpr u32 SHIFT = 4, SCALE = 0x7B807B80u;   // bfloat16 2^120 in both halves
    __device__ static u32 scale(u32 bits) {
        u32 r;
        asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(bits), "r"(SCALE), "r"(0x80008000u));
        return r;
    }
};
template <> struct Widen<f16_t> {
    static constexpr u32 SHIFT = 7, SCALE = 0x5C005C00u;   // fp16 2^8 in both halves
    __device__ static u32 scale(u32 bits) {
        u32 r;
        asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(bits), "r"(SCALE), "r"(0x80008000u));
        return r;
    }
};

// Two e4m3 values, in bits 8..15 and 24..31 of `high` (the rest zero), as two T in one word (the first in bits
// 0..15): sign kept, exponent and mantissa shifted into place (one shift and one three-way logic op), then scaled.
template <typename T>
__device__ __forceinline__ u32 widen_e4m3x2(u32 high) {
    constexpr u32 S = 8 - Widen<T>::SHIFT;
    return Widen<T>::scale(((high >> S) & (0x007F007Fu << Widen<T>::SHIFT)) | (high & 0x80008000u));
}

// The K and V tiles' rows x D bytes into rows of 16-bit values, four values a step, by THREADS threads (this one:
// `thread`); unrolled by four, so that four steps' loads from shared memory are in flight together (all of them
// took 240 registers where the kernel had 165, and fewer warps fit an SM).
template <typename T, int ROWS_, int D, int THREADS>
__device__ __forceinline__ void widen_tiles(u16 (*k_dst)[D + PAD], const unsigned char (*k_src)[D],
                                            u16 (*v_dst)[D + PAD], const unsigned char (*v_src)[D], int thread) {
    static_assert(ROWS_ * (D / 4) % THREADS == 0, "every thread takes the same number of steps");
#pragma unroll 4
    for (int j = 0; j < ROWS_ * (D / 4) / THREADS; ++j) {
        const int i = thread + j * THREADS, row = i / (D / 4), col = (i % (D / 4)) * 4;
        const u32 k_four = *reinterpret_cast<const u32*>(&k_src[row][col]);
        const u32 v_four = *reinterpret_cast<const u32*>(&v_src[row][col]);
        // Bytes 0 and 1 to bits 8..15 and 24..31, then bytes 2 and 3.
        *reinterpret_cast<uint2*>(&k_dst[row][col]) = make_uint2(
            widen_e4m3x2<T>(__byte_perm(k_four, 0u, 0x1404)), widen_e4m3x2<T>(__byte_perm(k_four, 0u, 0x3424)));
        *reinterpret_cast<uint2*>(&v_dst[row][col]) = make_uint2(
            widen_e4m3x2<T>(__byte_perm(v_four, 0u, 0x1404)), widen_e4m3x2<T>(__byte_perm(v_four, 0u, 0x3424)));
    }
}
