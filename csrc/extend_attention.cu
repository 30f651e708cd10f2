// Paged extend attention: each sequence's new tokens (a prefill, a prefill chunk continuing a cached prefix,
// or a single decode token) attend causally to everything before them, read back from the KV cache (the
// step's K/V are stored before attention runs). The whole ragged batch is one launch.
//
// A block takes up to ROWS query rows of one kv head: ROWS / GROUP consecutive new tokens of one sequence,
// times the GROUP query heads that share the kv head (row r = token r / GROUP, head r % GROUP), so every
// K/V tile is read once for the group. Each warp owns 16 rows and runs FlashAttention-2's loop on the
// tensor cores: S = Q K^T with mma.m16n8k16 (bf16 or fp16 in, fp32 out), an online softmax on S's
// registers, O += P V, with P fed back as the next mma's A operand straight from registers.
#include "common.cuh"
#include "mma.cuh"

constexpr int ROWS = 64;          // query rows per block (4 warps x 16)
constexpr int KEYS = 32;          // keys per tile; two tiles, one loading (cp.async) while one is used
constexpr int EXT_THREADS = 128;

// tile_seq[x], tile_token[x]: the sequence of block x and the index (among its new tokens) of its first
// token. query_start[s]: the row of sequence s's first new token in q and out; seq_lens[s]: its tokens
// including the new ones. Out-of-range rows and keys are masked; out gets exactly the valid rows.
// The cache's values are of type C: T, or e4m3_t (--kv-cache-dtype fp8: tiles staged as bytes, widened to T).
template <typename T, typename C, int D>
__global__ void __launch_bounds__(EXT_THREADS) paged_extend(
        T* __restrict__ out, i64 out_stride, const T* __restrict__ q, i64 q_stride, const C* __restrict__ cache,
        const i64* __restrict__ page_table, i64 page_table_stride, const int* __restrict__ tile_seq,
        const int* __restrict__ tile_token, const int* __restrict__ query_start, const int* __restrict__ seq_lens,
        int page_size, int num_kv_heads, int group, float scale_log2) {
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    constexpr bool BYTES = sizeof(C) == 1;   // an 8-bit cache: two byte tiles in flight, one widened tile
    constexpr int ELEMS = 16 / sizeof(C);    // cache values per 16-byte copy
    __shared__ __align__(16) u16 k_tile[BYTES ? 1 : 2][KEYS][D + PAD];     // [buffer][key][dim]
    __shared__ __align__(16) u16 v_tile[BYTES ? 1 : 2][KEYS][D + PAD];
    __shared__ __align__(16) unsigned char k_bytes[BYTES ? 2 : 1][BYTES ? KEYS : 1][D];
    __shared__ __align__(16) unsigned char v_bytes[BYTES ? 2 : 1][BYTES ? KEYS : 1][D];

    const int kv_head = blockIdx.y, seq = tile_seq[blockIdx.x], token0 = tile_token[blockIdx.x];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const int q0 = query_start[seq], num_new = query_start[seq + 1] - q0;
    const int len = seq_lens[seq], context = len - num_new;
    const int tokens_per_tile = ROWS / group;
    const int tile_tokens = min(tokens_per_tile, num_new - token0);
    const int last_pos = context + token0 + tile_tokens - 1;      // the tile's latest query position
    const i64 slot_stride = 2 * (i64)num_kv_heads * D;
    const i64* pages = page_table + seq * page_table_stride;

    // This thread's two rows, r0 = 16 * warp + gid and r1 = r0 + 8: their query position, or -1 if unused.
    int row_pos[2];
    const u32* q_row[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = warp * 16 + gid + 8 * h, token = r / group;
        const bool valid = r < tokens_per_tile * group && token < tile_tokens;
        row_pos[h] = valid ? context + token0 + token : -1;
        q_row[h] = valid ? reinterpret_cast<const u32*>(
            q + (q0 + token0 + token) * q_stride + (kv_head * group + r % group) * D) : nullptr;
    }
    // Q as A fragments (m16n8k16 layout): register j of k-step kk holds 2 columns of row r(j % 2).
    u32 qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const u32* src = q_row[j & 1];
            qa[kk][j] = src ? src[(kk * 16 + (j >> 1) * 8 + 2 * tig) / 2] : 0u;
        }

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int j = 0; j < 4; ++j) o[dt][j] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    auto load_tile = [&](int buffer, int key0) {   // keys past last_pos (or len) are zeros
        for (int c = threadIdx.x; c < KEYS * (D / ELEMS); c += EXT_THREADS) {
            const int key = c / (D / ELEMS), d = (c % (D / ELEMS)) * ELEMS, pos = key0 + key;
            const bool valid = pos <= last_pos && pos < len;
            const C* src = valid ? cache + (pages[pos / page_size] * page_size + pos % page_size) * slot_stride +
                                   (i64)kv_head * D + d : cache;
            const C* v_src = src + (valid ? (i64)num_kv_heads * D : 0);
            if constexpr (BYTES) {
                copy_async16(&k_bytes[buffer][key][d], src, valid);
                copy_async16(&v_bytes[buffer][key][d], v_src, valid);
            } else {
                copy_async16(&k_tile[buffer][key][d], src, valid);
                copy_async16(&v_tile[buffer][key][d], v_src, valid);
            }
        }
        copy_async_commit();
    };
    load_tile(0, 0);
    for (int key0 = 0, buffer = 0; key0 <= last_pos; key0 += KEYS, buffer ^= 1) {
        if (key0 + KEYS <= last_pos) load_tile(buffer ^ 1, key0 + KEYS);
        else copy_async_commit();   // an empty group keeps the count: the current tile is the older one
        copy_async_wait<1>();
        __syncthreads();
        if constexpr (BYTES) {
            widen_tiles<T, KEYS, D, EXT_THREADS>(k_tile[0], k_bytes[buffer], v_tile[0], v_bytes[buffer], threadIdx.x);
            __syncthreads();
        }
        const u16 (*k_rows)[D + PAD] = k_tile[BYTES ? 0 : buffer];
        const u16 (*v_rows)[D + PAD] = v_tile[BYTES ? 0 : buffer];

        // S = Q K^T for this warp's 16 rows and the tile's keys: 8 n-tiles of 8 keys.
        float s[KEYS / 8][4];
        qk_scores<T, KEYS, D>(s, qa, k_rows, gid, tig);
        // Online softmax over the tile, in base 2; element j of n-tile nt: row r(j / 2), key 2 * tig + j % 2.
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt)
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int h = j >> 1, key = key0 + nt * 8 + 2 * tig + (j & 1);
                s[nt][j] = key <= row_pos[h] ? s[nt][j] * scale_log2 : NEG_INF;
                tile_max[h] = fmaxf(tile_max[h], s[nt][j]);
            }
        float corr[2], base[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
            tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
            const float m_new = fmaxf(m[h], tile_max[h]);
            base[h] = m_new == NEG_INF ? 0.0f : m_new;      // a row with nothing to attend to yet stays at 0
            corr[h] = exp2f(m[h] - base[h]);
            m[h] = m_new;
            l[h] *= corr[h];
        }
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= corr[0];
            o[dt][1] *= corr[0];
            o[dt][2] *= corr[1];
            o[dt][3] *= corr[1];
        }
        u32 pa[KEYS / 16][4];
        softmax_to_a<T, KEYS>(s, base, l, pa);
        accumulate_pv<T, KEYS, D>(o, pa, v_rows, gid, tig);
        __syncthreads();   // this buffer is refilled by the next iteration's prefetch
    }

    // Finish: each row's sum lives across the 4 lanes that share it.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        if (row_pos[h] < 0) continue;
        const int r = warp * 16 + gid + 8 * h;
        u32* dst = reinterpret_cast<u32*>(out + (q0 + token0 + r / group) * out_stride + (kv_head * group + r % group) * D);
        const float inv = 1.0f / l[h];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[(dt * 8 + 2 * tig) / 2] = Mma<T>::pack(o[dt][2 * h] * inv, o[dt][2 * h + 1] * inv);
    }
}
