// RMSNorm, optionally fused with the residual add that precedes it, and SiLU-and-multiply.
//
// Semantics of the PyTorch reference (minisrv/kernels/reference.py): the residual sum is rounded to the
// storage type (it is stored), the norm and the weight product are computed in float and rounded once.
#include "common.cuh"

constexpr int NORM_THREADS = 512;   // minisrv/kernels/cuda.py NORM_THREADS
constexpr int NORM_VECS = 2;        // 16-byte vectors of a row a thread holds in registers (8192 bf16 values a block)

// One row, by a block of NORM_THREADS threads.
// ADD: res_row <- res_row + x, out_row <- rmsnorm(res_row) * weight; else out_row <- rmsnorm(x) * weight.
// The row goes in chunks of NORM_VECS vectors a thread, every load of a chunk in flight before any is used: a
// decode step's rows are a few KB, so their cost is load latency, not bandwidth (one 4096-wide bf16 row: 2.3 us,
// from 4.4 with 256 threads each loading a vector at a time, H200). A row of one chunk stays in registers for
// the second pass; a longer one is read again.
template <typename T, bool ADD>
__device__ __forceinline__ void rms_norm_row(T* __restrict__ out_row, T* __restrict__ res_row,
                                             const T* __restrict__ x_row, const T* __restrict__ weight, int hidden,
                                             float eps) {
    constexpr int VEC = Vec<T>::N;
    __shared__ float scratch[32];
    const int stride = blockDim.x * VEC, chunk = NORM_VECS * stride, first = threadIdx.x * VEC;
    const bool held = hidden <= chunk;
    float v[NORM_VECS][VEC], w[NORM_VECS][VEC];
    float sum_sq = 0.0f;
    for (int base = 0; base < hidden; base += chunk) {
        float r[NORM_VECS][VEC];
#pragma unroll
        for (int k = 0; k < NORM_VECS; ++k) {
            const int i = base + first + k * stride;
            if (i < hidden) {
                if (ADD) load_vec(res_row + i, r[k]);
                load_vec(weight + i, w[k]);
            }
        }
#pragma unroll
        for (int k = 0; k < NORM_VECS; ++k) {
            const int i = base + first + k * stride;
            if (i < hidden) load_vec(x_row + i, v[k]);
        }
#pragma unroll
        for (int k = 0; k < NORM_VECS; ++k) {
            const int i = base + first + k * stride;
            if (i < hidden) {
                if (ADD) {
#pragma unroll
                    for (int j = 0; j < VEC; ++j) v[k][j] = to_float(from_float<T>(v[k][j] + r[k][j]));   // as stored
                    store_vec(res_row + i, v[k]);
                }
#pragma unroll
                for (int j = 0; j < VEC; ++j) sum_sq += v[k][j] * v[k][j];
            }
        }
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    for (int base = 0; base < hidden; base += chunk) {
#pragma unroll
        for (int k = 0; k < NORM_VECS; ++k) {
            const int i = base + first + k * stride;
            if (i < hidden) {
                if (!held) {
                    load_vec((ADD ? res_row : x_row) + i, v[k]);
                    load_vec(weight + i, w[k]);
                }
#pragma unroll
                for (int j = 0; j < VEC; ++j) v[k][j] = v[k][j] * inv_rms * w[k][j];
                store_vec(out_row + i, v[k]);
            }
        }
    }
}

// One block of NORM_THREADS per row. ADD: residual <- residual + x, out <- rmsnorm(residual) * weight; else
// out <- rmsnorm(x) * weight.
template <typename T>
__global__ void __launch_bounds__(NORM_THREADS)
rms_norm(T* out, const T* x, const T* weight, int hidden, i64 out_stride, i64 x_stride, float eps) {
    rms_norm_row<T, false>(out + blockIdx.x * out_stride, nullptr, x + blockIdx.x * x_stride, weight, hidden, eps);
}

template <typename T>
__global__ void __launch_bounds__(NORM_THREADS)
add_rms_norm(T* out, T* residual, const T* x, const T* weight, int hidden, i64 out_stride, i64 residual_stride,
             i64 x_stride, float eps) {
    rms_norm_row<T, true>(out + blockIdx.x * out_stride, residual + blockIdx.x * residual_stride,
                          x + blockIdx.x * x_stride, weight, hidden, eps);
}

// out[t, :] = silu(x[t, :inter]) * x[t, inter:]; grid (tokens, column blocks).
template <typename T>
__global__ void silu_and_mul(T* __restrict__ out, const T* __restrict__ x, int inter, i64 out_stride, i64 x_stride) {
    constexpr int VEC = Vec<T>::N;
    const i64 row = blockIdx.x;
    const int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC;
    if (i >= inter) return;
    float gate[VEC], up[VEC];
    load_vec(x + row * x_stride + i, gate);
    load_vec(x + row * x_stride + inter + i, up);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        // The reference rounds silu(gate) to the storage type before the product (two PyTorch ops).
        const float silu = to_float(from_float<T>(gate[j] / (1.0f + __expf(-gate[j]))));
        gate[j] = silu * up[j];
    }
    store_vec(out + row * out_stride + i, gate);
}
