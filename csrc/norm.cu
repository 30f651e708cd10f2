// RMSNorm, optionally fused with the residual add that precedes it, and SiLU-and-multiply.
//
// Semantics of the PyTorch reference (minisrv/kernels/reference.py): the residual sum is rounded to the
// storage type (it is stored), the norm and the weight product are computed in float and rounded once.
#include "common.cuh"

// One block per row. ADD: residual <- residual + x, out <- rmsnorm(residual) * weight; else out <- rmsnorm(x).
template <typename T, bool ADD>
__device__ __forceinline__ void rms_norm_body(T* __restrict__ out, T* __restrict__ residual, const T* __restrict__ x,
                                const T* __restrict__ weight, int hidden, i64 out_stride, i64 residual_stride,
                                i64 x_stride, float eps) {
    constexpr int VEC = Vec<T>::N;
    __shared__ float scratch[32];
    const i64 row = blockIdx.x;
    const T* x_row = x + row * x_stride;
    T* res_row = ADD ? residual + row * residual_stride : nullptr;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        float v[VEC];
        load_vec(x_row + i, v);
        if (ADD) {
            float r[VEC];
            load_vec(res_row + i, r);
#pragma unroll
            for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(v[j] + r[j]));   // as stored
            store_vec(res_row + i, v);
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum_sq += v[j] * v[j];
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq, scratch) / hidden + eps);
    const T* src = ADD ? res_row : x_row;
    T* out_row = out + row * out_stride;
    for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
        float v[VEC], w[VEC];
        load_vec(src + i, v);
        load_vec(weight + i, w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = v[j] * inv_rms * w[j];
        store_vec(out_row + i, v);
    }
}

template <typename T>
__global__ void rms_norm(T* out, const T* x, const T* weight, int hidden, i64 out_stride, i64 x_stride, float eps) {
    rms_norm_body<T, false>(out, nullptr, x, weight, hidden, out_stride, 0, x_stride, eps);
}

template <typename T>
__global__ void add_rms_norm(T* out, T* residual, const T* x, const T* weight, int hidden, i64 out_stride,
                             i64 residual_stride, i64 x_stride, float eps) {
    rms_norm_body<T, true>(out, residual, x, weight, hidden, out_stride, residual_stride, x_stride, eps);
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
