// Linear layers of small decode batches: y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for M <= 8 rows of x.
//
// At a handful of rows a projection is a stream over its weight: each weight element is used M times, so
// the time is the weight's bytes over the memory bandwidth. cuBLAS's kernels for these shapes split K and
// reduce in a second kernel or leave bandwidth unused on the smaller matrices (bench/profile_step.py); here one
// warp owns an output feature and streams its weight row in 16-byte loads, UNROLL loads in flight per lane,
// with the M rows of x read through L1 (they are tiny and every warp of the SM reads them). Sums are float;
// the order of a row's terms does not depend on M, so a row's output is the same in any batch of up to 8.
#include "common.cuh"

constexpr int WARPS = 8;     // output features per block
constexpr int UNROLL = 4;    // 16-byte weight loads in flight per lane

template <typename T, int M>
__global__ void __launch_bounds__(WARPS * 32) gemv(
        T* __restrict__ y, i64 y_stride, const T* __restrict__ x, i64 x_stride, const T* __restrict__ w,
        const T* __restrict__ bias, int n_features, int k) {
    constexpr int VEC = Vec<T>::N;
    const int lane = threadIdx.x & 31;
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    if (n >= n_features) return;
    const T* w_row = w + (i64)n * k;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.0f;
    constexpr int STEP = 32 * VEC;
    int k0 = lane * VEC;
    for (; k0 + (UNROLL - 1) * STEP < k; k0 += UNROLL * STEP) {
        float wv[UNROLL][VEC];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) load_vec(w_row + k0 + u * STEP, wv[u]);
#pragma unroll
        for (int u = 0; u < UNROLL; ++u)
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float xv[VEC];
                load_vec(x + m * x_stride + k0 + u * STEP, xv);
#pragma unroll
                for (int j = 0; j < VEC; ++j) acc[m] += wv[u][j] * xv[j];
            }
    }
    for (; k0 < k; k0 += STEP) {
        float wv[VEC];
        load_vec(w_row + k0, wv);
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float xv[VEC];
            load_vec(x + m * x_stride + k0, xv);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[m] += wv[j] * xv[j];
        }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
        const float total = warp_sum(acc[m]);
        if (lane == 0) y[m * y_stride + n] = from_float<T>(total + (bias ? to_float(bias[n]) : 0.0f));
    }
}
