// Per layer and step, in one launch: Qwen3's per-head q/k RMSNorm (when given), rotary embedding of q and k
// in place, and the store of the step's K and V into their KV-cache slots.
//
// Layouts (minisrv/kernels/reference.py): qkv row t = [q heads | k heads | v heads], head_dim D each, q/k
// in the interleaved RoPE layout (pairs (2i, 2i+1)); rotation table [max_positions, D/2] of (cos, sin);
// cache slot s = page * page_size + offset holds [2, num_kv_heads, D] (K then V), of type C: T, or e4m3_t
// (--kv-cache-dtype fp8, rounded on the way in). A negative slot is padding: its q/k are still rotated, nothing is
// stored.
#include "common.cuh"

template <typename T, typename C>
__global__ void rope_store_kv(T* __restrict__ qkv, i64 qkv_stride, const i64* __restrict__ positions,
                              const float* __restrict__ rotations, const T* __restrict__ qk_norm, float eps,
                              C* __restrict__ cache, const i64* __restrict__ slots, int num_heads,
                              int num_kv_heads, int head_dim) {
    const i64 token = blockIdx.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    const int half = head_dim / 2;
    T* row = qkv + token * qkv_stride;
    const float2* rot = reinterpret_cast<const float2*>(rotations) + positions[token] * half;
    const i64 slot = slots[token];
    const i64 slot_stride = 2 * (i64)num_kv_heads * head_dim;
    const int rotated_heads = num_heads + num_kv_heads;
    // q and k heads: a warp per head, a lane per pair (2 pairs for D = 128).
    for (int h = warp; h < rotated_heads; h += warps) {
        T* head = row + h * head_dim;
        float inv_rms = 1.0f;
        if (qk_norm != nullptr) {
            float sum_sq = 0.0f;
            for (int i = lane; i < half; i += 32) {
                const float x0 = to_float(head[2 * i]), x1 = to_float(head[2 * i + 1]);
                sum_sq += x0 * x0 + x1 * x1;
            }
            inv_rms = rsqrtf(warp_sum(sum_sq) / head_dim + eps);
        }
        for (int i = lane; i < half; i += 32) {
            float x0 = to_float(head[2 * i]), x1 = to_float(head[2 * i + 1]);
            if (qk_norm != nullptr) {
                x0 *= inv_rms * to_float(qk_norm[h * head_dim + 2 * i]);
                x1 *= inv_rms * to_float(qk_norm[h * head_dim + 2 * i + 1]);
            }
            const float2 cs = rot[i];
            const T y0 = from_float<T>(x0 * cs.x - x1 * cs.y), y1 = from_float<T>(x0 * cs.y + x1 * cs.x);
            head[2 * i] = y0;
            head[2 * i + 1] = y1;
            if (h >= num_heads && slot >= 0) {
                C* k = cache + slot * slot_stride + (h - num_heads) * head_dim;
                k[2 * i] = from_float<C>(to_float(y0));   // exact when C is T
                k[2 * i + 1] = from_float<C>(to_float(y1));
            }
        }
    }
    if (slot < 0) return;
    // V heads: a straight copy, 16 bytes a thread; into an 8-bit cache, converted value by value.
    const int v_elems = num_kv_heads * head_dim;
    const T* v = row + rotated_heads * head_dim;
    C* v_dst = cache + slot * slot_stride + v_elems;
    if constexpr (sizeof(C) == sizeof(T)) {
        constexpr int VEC = Vec<T>::N;
        for (int i = threadIdx.x * VEC; i < v_elems; i += blockDim.x * VEC)
            *reinterpret_cast<Vec<T>*>(v_dst + i) = *reinterpret_cast<const Vec<T>*>(v + i);
    } else {
        for (int i = threadIdx.x; i < v_elems; i += blockDim.x) v_dst[i] = from_float<C>(to_float(v[i]));
    }
}
