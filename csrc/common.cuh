// What every minisrv kernel shares: 16-bit float storage, vector loads, warp reductions.
//
// Kernels are compiled at run time by NVRTC (through CuPy, minisrv/kernels/cuda.py), which inlines this
// header into each source, so it depends on no CUDA header: 16-bit floats are raw bits converted with
// PTX `cvt`, and every tensor arrives as a raw pointer plus explicit strides.
#pragma once

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// Storage types: the tensor's dtype. Arithmetic is always float.
struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16_t v) { return __uint_as_float(((u32)v.bits) << 16); }
__device__ __forceinline__ float to_float(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T from_float(float f);
template <> __device__ __forceinline__ float from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ bf16_t from_float<bf16_t>(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return bf16_t{h};
}
template <> __device__ __forceinline__ f16_t from_float<f16_t>(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return f16_t{h};
}

// An 8-bit float of the KV cache (--kv-cache-dtype fp8): e4m3 (no infinities, +-448 at most), converted with
// PTX cvt (sm_89 and later). Storing saturates to +-448, as vLLM's fp8 KV cache does.
struct e4m3_t { unsigned char bits; };
__device__ __forceinline__ float to_float(e4m3_t v) {
    u32 halves;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"((u16)v.bits));
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((u16)(halves & 0xffffu)));
    return f;
}
template <> __device__ __forceinline__ e4m3_t from_float<e4m3_t>(float f) {
    u16 pair;   // the first operand goes to the upper byte
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(0.0f), "f"(f));
    return e4m3_t{(unsigned char)(pair & 0xffu)};
}

// VEC elements of T in one 16-byte access. Aligned to 16 so that a copy is one 128-bit load or store: aligned only
// as T, it compiled to eight 16-bit accesses for bfloat16 (with csrc/norm.cu's batched loads, a one-row RMSNorm
// went from 4.4 us to 2.3 on an H200).
// Every address given to load_vec / store_vec must be a multiple of 16 bytes (minisrv/kernels/cuda.py checks).
template <typename T> struct alignas(16) Vec {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* src, float (&out)[16 / sizeof(T)]) {
    Vec<T> raw = *reinterpret_cast<const Vec<T>*>(src);
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_float(raw.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* dst, const float (&in)[16 / sizeof(T)]) {
    Vec<T> raw;
#pragma unroll
    for (int i = 0; i < Vec<T>::N; ++i) raw.v[i] = from_float<T>(in[i]);
    *reinterpret_cast<Vec<T>*>(dst) = raw;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats; the call ends with a barrier, so `scratch` may be reused at once.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_sum(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : 0.0f;
    x = warp_sum(x);
    __syncthreads();
    return x;
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    x = warp_max(x);
    if (lane == 0) scratch[warp] = x;
    __syncthreads();
    x = lane < warps ? scratch[lane] : -__int_as_float(0x7f800000);
    x = warp_max(x);
    __syncthreads();
    return x;
}

#define NEG_INF (-__int_as_float(0x7f800000))
#define POS_INF (__int_as_float(0x7f800000))
