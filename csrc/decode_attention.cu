// Paged decode attention: one new query token per sequence against its cached keys and values.
//
// Split-K: a block takes (split, kv head, sequence) and a run of consecutive positions; the query heads that
// share the kv head (up to 16) are computed together, so each K/V row is read once for all of them.
// A sequence's splits are SPLIT positions each, or, for a sequence longer than SPLIT * max_splits, the fewest
// multiples of SPLIT that make at most max_splits splits. That depends on the sequence's length and the launch's
// max_splits alone, so with the same max_splits its result never depends on what else is in the batch: blocks
// past a sequence's splits do nothing and the merge reads only its own. The caller picks max_splits from the
// batch size (minisrv/kernels/cuda.py decode_splits): many splits to spread one long sequence over the SMs,
// few for a large batch, whose sequences fill them already and whose grid would otherwise be mostly empty
// blocks (a CUDA graph launches for the longest length any sequence may reach).
// Positions at or past seq_len are never read: a partial last page cannot inject NaN.
//
// Cache slot s = page * page_size + offset holds [2, num_kv_heads, D] (K then V) of type C: T, or e4m3_t
// (--kv-cache-dtype fp8: tiles staged as bytes, widened to T in shared memory, mma.cuh widen_tiles);
// page_table[b, i] is the page of positions [i * page_size, (i + 1) * page_size) of sequence b.
#include "common.cuh"
#include "mma.cuh"

constexpr int SPLIT = 64;      // positions per block (a multiple of them for long sequences)
constexpr int TILE = 16;       // positions per tile in shared memory
constexpr int STAGES = 3;      // tiles in flight: the warp computes on one while the next two stream in

// Positions per split of a sequence of `len` positions: SPLIT, or a multiple when it has more than max_splits.
__device__ __forceinline__ int split_len(int len, int max_splits) {
    const int units = (len + SPLIT - 1) / SPLIT;
    return SPLIT * ((units + max_splits - 1) / max_splits);
}

// One warp per (split, kv head, sequence). The group's query heads are the rows of an m16n8k16 tile (rows
// past the group are zeros), so the tensor cores do the dot products: S = Q K^T over a tile of TILE
// positions staged in shared memory, an online softmax on S's registers, O += P V. Tiles are loaded with
// cp.async STAGES - 1 ahead of the one in use; at 27 KB of shared memory a block, eight warps fit an SM.
// A sequence of one split (len <= SPLIT) is written straight to out, and the merge skips it; a padding
// row (len 0) gets zeros.
template <typename T, typename C, int D>
__global__ void __launch_bounds__(32) paged_decode_split(
        T* __restrict__ out, i64 out_stride, float* __restrict__ part_out, float* __restrict__ part_lse,
        const T* __restrict__ q, i64 q_stride,
        const C* __restrict__ cache, const i64* __restrict__ page_table, i64 page_table_stride,
        const i64* __restrict__ seq_lens, int page_size, int num_kv_heads, int group, int max_splits,
        float scale_log2) {
    static_assert(D % 16 == 0, "head_dim must be a multiple of 16");
    constexpr bool BYTES = sizeof(C) == 1;   // an 8-bit cache: STAGES byte tiles in flight, one widened tile
    constexpr int ELEMS = 16 / sizeof(C);    // cache values per 16-byte copy
    __shared__ __align__(16) u16 k_tile[BYTES ? 1 : STAGES][TILE][D + PAD];
    __shared__ __align__(16) u16 v_tile[BYTES ? 1 : STAGES][TILE][D + PAD];
    __shared__ __align__(16) unsigned char k_bytes[BYTES ? STAGES : 1][BYTES ? TILE : 1][D];
    __shared__ __align__(16) unsigned char v_bytes[BYTES ? STAGES : 1][BYTES ? TILE : 1][D];
    __shared__ int slots[SPLIT];   // cache slot of each position of the split (a pool holds far fewer than 2^31)
    const int split = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
    const int lane = threadIdx.x, gid = lane >> 2, tig = lane & 3;
    const int num_heads = num_kv_heads * group;
    const int len = (int)seq_lens[seq], chunk = split_len(len, max_splits), start = split * chunk;
    const i64 out_row = ((i64)seq * num_heads + kv_head * group) * max_splits + split;   // head g: + g * max_splits
    if (start >= len) {
        if (lane < group) part_lse[out_row + lane * max_splits] = NEG_INF;
        if (len == 0 && split == 0)
            for (int i = lane; i < group * D; i += 32)
                out[seq * out_stride + (kv_head * group + i / D) * D + i % D] = from_float<T>(0.0f);
        return;
    }
    const int split_end = min(len, start + chunk);
    const bool alone = len <= chunk;   // the only split: this block's result is final
    const i64 slot_stride = 2 * (i64)num_kv_heads * D;
    const i64* pages = page_table + seq * page_table_stride;

    // Q as A fragments: register j of k-step kk holds 2 columns of row gid + 8 (j & 1), a query head.
    u32 qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int row = gid + 8 * (j & 1);
            qa[kk][j] = row < group ? reinterpret_cast<const u32*>(q + seq * q_stride + (kv_head * group + row) * D)
                                          [(kk * 16 + (j >> 1) * 8 + 2 * tig) / 2] : 0u;
        }
    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
        for (int j = 0; j < 4; ++j) o[dt][j] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};

    // The split in runs of SPLIT positions: every page lookup of a run up front, independent loads in flight
    // together (looked up inside the tile loads, each one's latency would stall the copies behind it, and a
    // lone warp has nothing else to run), then its tiles through the cp.async pipeline.
    for (int run = start; run < split_end; run += SPLIT) {
        const int end = min(split_end, run + SPLIT);
        __syncwarp();   // the previous run's last tile is consumed before its slots are overwritten
#pragma unroll
        for (int j = 0; j < SPLIT / 32; ++j) {
            const int pos = run + j * 32 + lane;
            slots[j * 32 + lane] = pos < end ? (int)(pages[pos / page_size] * page_size + pos % page_size) : 0;
        }
        __syncwarp();
        auto load_tile = [&](int buffer, int key0) {
            for (int c = lane; c < TILE * (D / ELEMS); c += 32) {
                const int key = c / (D / ELEMS), d = (c % (D / ELEMS)) * ELEMS, pos = key0 + key;
                const bool valid = pos < end;   // positions past the sequence are never read: they may hold anything
                const C* src = valid ? cache + slots[pos - run] * slot_stride + (i64)kv_head * D + d : cache;
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
        for (int stage = 0; stage < STAGES - 1; ++stage) {
            if (run + stage * TILE < end) load_tile(stage, run + stage * TILE);
            else copy_async_commit();   // empty groups keep the count: tile t is always group t
        }
        for (int key0 = run, t = 0; key0 < end; key0 += TILE, ++t) {
            const int buffer = t % STAGES, ahead = key0 + (STAGES - 1) * TILE;
            if (ahead < end) load_tile((t + STAGES - 1) % STAGES, ahead);
            else copy_async_commit();
            copy_async_wait<STAGES - 1>();   // groups 0..t are complete: tile t is in
            __syncwarp();
            if constexpr (BYTES) {
                widen_tiles<T, TILE, D, 32>(k_tile[0], k_bytes[buffer], v_tile[0], v_bytes[buffer], lane);
                __syncwarp();
            }
            const u16 (*k_rows)[D + PAD] = k_tile[BYTES ? 0 : buffer];
            const u16 (*v_rows)[D + PAD] = v_tile[BYTES ? 0 : buffer];
            float s[TILE / 8][4];
            qk_scores<T, TILE, D>(s, qa, k_rows, gid, tig);
            float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
            for (int nt = 0; nt < TILE / 8; ++nt)
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int pos = key0 + nt * 8 + 2 * tig + (j & 1);
                    s[nt][j] = pos < end ? s[nt][j] * scale_log2 : NEG_INF;
                    tile_max[j >> 1] = fmaxf(tile_max[j >> 1], s[nt][j]);
                }
            float base[2];
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
                tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
                const float m_new = fmaxf(m[h], tile_max[h]);   // finite: every tile holds a position < end
                const float corr = exp2f(m[h] - m_new);
                base[h] = m_new;
                m[h] = m_new;
                l[h] *= corr;
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    o[dt][2 * h] *= corr;
                    o[dt][2 * h + 1] *= corr;
                }
            }
            u32 pa[TILE / 16][4];
            softmax_to_a<T, TILE>(s, base, l, pa);
            accumulate_pv<T, TILE, D>(o, pa, v_rows, gid, tig);
            __syncwarp();   // this buffer is refilled by the next iteration's prefetch
        }
        copy_async_wait<0>();   // the run's trailing empty groups: nothing is left in flight across runs
    }
    // Rows gid and gid + 8 are query heads when below the group; their sums live across 4 lanes.
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        const int row = gid + 8 * h;
        if (row >= group) continue;
        const float inv = 1.0f / l[h];
        if (alone) {
            T* dst = out + seq * out_stride + (kv_head * group + row) * D;
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                dst[dt * 8 + 2 * tig] = from_float<T>(o[dt][2 * h] * inv);
                dst[dt * 8 + 2 * tig + 1] = from_float<T>(o[dt][2 * h + 1] * inv);
            }
            continue;
        }
        float* dst = part_out + (out_row + (i64)row * max_splits) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            dst[dt * 8 + 2 * tig] = o[dt][2 * h] * inv;
            dst[dt * 8 + 2 * tig + 1] = o[dt][2 * h + 1] * inv;
        }
        if (tig == 0) part_lse[out_row + row * max_splits] = m[h] * 0.6931471805599453f + __logf(l[h]);
    }
}

// out[seq, head, :] = the splits' outputs weighted by their share of the softmax mass; grid (num_heads, batch).
// A block reads many splits at once (MERGE_THREADS / (D / 4) rows of float4 columns): a long sequence alone in
// a batch has a hundred splits and only num_heads blocks, and one thread walking them in turn would wait on
// each load. Sequences of one split (or none) were written by the split kernel.
constexpr int MERGE_THREADS = 512;

template <typename T, int D>
__global__ void __launch_bounds__(MERGE_THREADS) paged_decode_merge(
        T* __restrict__ out, i64 out_stride, const float* __restrict__ part_out, const float* __restrict__ part_lse,
        const i64* __restrict__ seq_lens, int max_splits) {
    constexpr int COLS = D / 4, ROWS = MERGE_THREADS / COLS;
    __shared__ float scratch[32];
    __shared__ float4 acc_rows[ROWS][COLS];
    __shared__ float weight_rows[ROWS];
    const int head = blockIdx.x, seq = blockIdx.y, num_heads = gridDim.x;
    const int len = (int)seq_lens[seq], chunk = split_len(len, max_splits);
    const int splits = (len + chunk - 1) / chunk;
    if (splits <= 1) return;
    const i64 base = ((i64)seq * num_heads + head) * max_splits;
    float m = NEG_INF;
    for (int s = threadIdx.x; s < splits; s += MERGE_THREADS) m = fmaxf(m, part_lse[base + s]);
    m = block_max(m, scratch);
    const int col = threadIdx.x % COLS, row = threadIdx.x / COLS;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float weight_sum = 0.0f;
#pragma unroll 4
    for (int s = row; s < splits; s += ROWS) {
        const float w = __expf(part_lse[base + s] - m);
        const float4 v = reinterpret_cast<const float4*>(part_out + (base + s) * D)[col];
        weight_sum += w;
        acc.x += w * v.x;
        acc.y += w * v.y;
        acc.z += w * v.z;
        acc.w += w * v.w;
    }
    acc_rows[row][col] = acc;
    if (col == 0) weight_rows[row] = weight_sum;
    __syncthreads();
    if (row != 0) return;
    float total = weight_rows[0];
    for (int r = 1; r < ROWS; ++r) {
        const float4 v = acc_rows[r][col];
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
        total += weight_rows[r];
    }
    T* dst = out + seq * out_stride + head * D + col * 4;
    dst[0] = from_float<T>(acc.x / total);
    dst[1] = from_float<T>(acc.y / total);
    dst[2] = from_float<T>(acc.z / total);
    dst[3] = from_float<T>(acc.w / total);
}
