// Fused sampling: one block per row picks the next token from float32 logits, with vLLM V1's semantics and
// order (minisrv/engine/sampling.py is the reference): greedy rows take the first maximum; sampled rows
// divide by the temperature, then apply min-p, top-k, top-p (thresholds, so ties at a cut are kept) and
// draw one uniform from Philox4x32-10 keyed by (seed, output position), cuRAND's stream, for an inverse
// transform over the kept tokens in vocabulary order. No full sort of the vocabulary:
// - the k-th largest value is a radix select over the logits' order-preserving 32-bit keys (histograms
//   of 11, 11 and 10 bits, one pass each, the first built in the pass that finds the maximum);
// - top-k up to CANDIDATES (and top-p whose nucleus lies among the CANDIDATES largest) are finished in
//   shared memory, a small top-k straight from the level-1 histogram when its bin fits there; a flatter
//   nucleus is found by bisection over the keys, one pass per step.
// NaN counts as -inf, and so does a token that the row's grammar bitmask refuses (structured output: bit b of
// word w allows token 32 * w + b). A row whose maximum is not finite is greedy: all -inf gives token 0, +inf the
// first +inf; never an out-of-range id.
#include "common.cuh"

constexpr int SAMPLE_THREADS = 1024;
constexpr int CANDIDATES = 1024;
constexpr int BINS = 2048;
constexpr int TOP_MAX = 64;                  // logprob alternatives collected before ranking (n <= 20)
constexpr float GREEDY_TEMPERATURE = 1e-5f;  // vLLM's _SAMPLING_EPS
constexpr u32 NO_BIN = 0xffffffffu;

__device__ __forceinline__ float clean(float x) { return x != x ? NEG_INF : x; }

// Token i's value under a grammar bitmask (nullptr: every token allowed).
__device__ __forceinline__ float allow(float v, const u32* __restrict__ allowed, int i) {
    return allowed == nullptr || ((allowed[i >> 5] >> (i & 31)) & 1u) ? v : NEG_INF;
}

// Larger float, larger key (for non-NaN values).
__device__ __forceinline__ u32 order_key(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// curand_init(seed, subsequence = position, offset = 0) then curand_uniform: a float in (0, 1].
__device__ float philox_uniform(u64 seed, u64 position) {
    u32 c0 = 0, c1 = 0, c2 = (u32)position, c3 = (u32)(position >> 32);
    u32 k0 = (u32)seed, k1 = (u32)(seed >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const u64 p0 = (u64)c0 * 0xD2511F53u, p1 = (u64)c2 * 0xCD9E8D57u;
        const u32 n0 = (u32)(p1 >> 32) ^ c1 ^ k0, n2 = (u32)(p0 >> 32) ^ c3 ^ k1;
        c1 = (u32)p1;
        c3 = (u32)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return __uint2float_rn(c0) * 2.3283064365386963e-10f + 1.1641532182693481e-10f;   // x 2^-32 + 2^-33
}

struct SampleShared {
    u32 hist[BINS];
    float cand_val[CANDIDATES];
    float cand_w[CANDIDATES];
    int cand_idx[CANDIDATES];
    u32 cand_key[CANDIDATES];   // order_key of the raw logit
    float f[32];
    u32 u[32];
    int count;
    u32 bin, above;
    float threshold;
    int chosen;
};

// Sum over threads with a higher index than this one (exclusive); the call ends with a barrier.
__device__ u32 block_suffix_exclusive(u32 x, u32* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    u32 inclusive = x;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const u32 y = __shfl_down_sync(0xffffffffu, inclusive, offset);
        if (lane + offset < 32) inclusive += y;
    }
    if (lane == 0) scratch[warp] = inclusive;
    __syncthreads();
    u32 later_warps = 0;
    for (int w = warp + 1; w < warps; ++w) later_warps += scratch[w];
    __syncthreads();
    return later_warps + inclusive - x;
}

__device__ float block_prefix_exclusive(float x, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float inclusive = x;
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const float y = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += y;
    }
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    float earlier_warps = 0.0f;
    for (int w = 0; w < warp; ++w) earlier_warps += scratch[w];
    __syncthreads();
    return earlier_warps + inclusive - x;
}

// The first index of the block's largest value; every thread gets (value, index).
__device__ void block_argmax(float& value, int& index, SampleShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, value, offset);
        const int i = __shfl_xor_sync(0xffffffffu, index, offset);
        if (v > value || (v == value && i < index)) {
            value = v;
            index = i;
        }
    }
    if (lane == 0) {
        sh.f[warp] = value;
        sh.u[warp] = (u32)index;
    }
    __syncthreads();
    value = NEG_INF;
    index = 0x7fffffff;
    for (int w = 0; w < warps; ++w)
        if (sh.f[w] > value || (sh.f[w] == value && (int)sh.u[w] < index)) {
            value = sh.f[w];
            index = (int)sh.u[w];
        }
    __syncthreads();
}

__device__ int block_min_int(int x, SampleShared& sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = min(x, __shfl_xor_sync(0xffffffffu, x, offset));
    if (lane == 0) sh.u[warp] = (u32)x;
    __syncthreads();
    int result = 0x7fffffff;
    for (int w = 0; w < warps; ++w) result = min(result, (int)sh.u[w]);
    __syncthreads();
    return result;
}

__device__ int block_max_int(int x, SampleShared& sh) { return -block_min_int(-x, sh); }

constexpr int UNROLL = 4;   // 16-byte loads each thread has in flight before it uses the first

// visit(value, index, valid) for every element of the row (NaN already -inf), the same number of times in every
// thread, so warp-synchronous work inside visit is safe. Threads take 4-value groups g = threadIdx.x + j *
// blockDim.x (16-byte loads when the row allows), so a thread meets its indices in increasing order.
template <typename Visit>
__device__ __forceinline__ void scan_row(const float* x, int vocab, Visit visit, const u32* allowed = nullptr) {
    if ((reinterpret_cast<size_t>(x) & 15) == 0 && (vocab & 3) == 0) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
        const int groups = vocab >> 2;
        for (int start = 0; start < groups; start += UNROLL * blockDim.x) {
            float4 v[UNROLL];
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) {
                const int g = start + j * blockDim.x + threadIdx.x;
                v[j] = g < groups ? x4[g] : make_float4(NEG_INF, NEG_INF, NEG_INF, NEG_INF);
            }
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) {
                const int g = start + j * blockDim.x + threadIdx.x;
                const bool valid = g < groups;
                const u32* a = valid ? allowed : nullptr;   // past the row: already -inf, and no word to read
                visit(allow(clean(v[j].x), a, 4 * g), 4 * g, valid);
                visit(allow(clean(v[j].y), a, 4 * g + 1), 4 * g + 1, valid);
                visit(allow(clean(v[j].z), a, 4 * g + 2), 4 * g + 2, valid);
                visit(allow(clean(v[j].w), a, 4 * g + 3), 4 * g + 3, valid);
            }
        }
    } else {
        for (int start = 0; start < vocab; start += 4 * UNROLL * blockDim.x) {
            float v[4 * UNROLL];
#pragma unroll
            for (int j = 0; j < 4 * UNROLL; ++j) {
                const int i = start + j * blockDim.x + threadIdx.x;
                v[j] = i < vocab ? allow(clean(x[i]), allowed, i) : NEG_INF;
            }
#pragma unroll
            for (int j = 0; j < 4 * UNROLL; ++j) {
                const int i = start + j * blockDim.x + threadIdx.x;
                visit(v[j], i, i < vocab);
            }
        }
    }
}

// visit(value, index) over elements [begin, end) in order (16-byte loads where aligned): a thread's own chunk.
template <typename Visit>
__device__ __forceinline__ void scan_chunk(const float* x, int begin, int end, Visit visit,
                                           const u32* allowed = nullptr) {
    int i = begin;
    if ((reinterpret_cast<size_t>(x + i) & 15) == 0)
        for (; i + 4 * UNROLL <= end; i += 4 * UNROLL) {
            float4 v[UNROLL];
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) v[j] = reinterpret_cast<const float4*>(x + i)[j];
#pragma unroll
            for (int j = 0; j < UNROLL; ++j) {
                visit(allow(clean(v[j].x), allowed, i + 4 * j), i + 4 * j);
                visit(allow(clean(v[j].y), allowed, i + 4 * j + 1), i + 4 * j + 1);
                visit(allow(clean(v[j].z), allowed, i + 4 * j + 2), i + 4 * j + 2);
                visit(allow(clean(v[j].w), allowed, i + 4 * j + 3), i + 4 * j + 3);
            }
        }
    for (; i < end; ++i) visit(allow(clean(x[i]), allowed, i), i);
}

// Count a value in its histogram bin. Plain shared-memory atomics: grouping a warp's lanes by bin with
// __match_any_sync first cost more than the collisions it saves (bench/kernels.py on an H200: top-k 50 at
// batch 1 took 151 us with it, 77 us without).
__device__ __forceinline__ void histogram_add(u32 bin, u32* hist) {
    if (bin != NO_BIN) atomicAdd(&hist[bin], 1u);
}

// Given the histogram of the current level, the bin where the count from the top reaches `rank`; it and the
// count above it land in sh.bin, sh.above (every thread reads them after the call).
__device__ void find_rank_bin(int bins, u32 rank, SampleShared& sh) {
    const int per = bins / blockDim.x;
    u32 own = 0;
    for (int j = 0; j < per; ++j) own += sh.hist[threadIdx.x * per + j];
    u32 above = block_suffix_exclusive(own, sh.u);
    for (int j = per - 1; j >= 0; --j) {
        const u32 b = threadIdx.x * per + j, n = sh.hist[b];
        if (above < rank && rank <= above + n) {
            sh.bin = b;
            sh.above = above;
        }
        above += n;
    }
    __syncthreads();
}

// The key of the k-th largest (1-based) value of the row: three histogram levels of 11, 11 and 10 bits, one pass
// each; level 1 may come ready in sh.hist (built while looking for the maximum).
__device__ u32 kth_largest_key(const float* x, int vocab, u32 k, bool level1_ready, SampleShared& sh,
                               const u32* allowed = nullptr) {
    u32 prefix = 0, rank = k;
    int known = 0;
    const int widths[3] = {11, 11, 10};
    for (int level = 0; level < 3; ++level) {
        const int width = widths[level], shift = 32 - known - width, bins = 1 << width;
        if (level > 0 || !level1_ready) {
            for (int b = threadIdx.x; b < bins; b += blockDim.x) sh.hist[b] = 0;
            __syncthreads();
            scan_row(x, vocab, [&](float v, int, bool valid) {
                const u32 key = order_key(v);
                const bool in = valid && (known == 0 || (key >> (32 - known)) == prefix);
                if (in) histogram_add((key >> shift) & (bins - 1), sh.hist);
            }, allowed);
            __syncthreads();
        }
        find_rank_bin(bins, rank, sh);
        prefix = (prefix << width) | sh.bin;
        rank -= sh.above;
        known += width;
        __syncthreads();
    }
    return prefix;
}

// The key of the k-th largest (1-based) raw value among the n candidates, which hold every value at or above
// it: the smallest key with fewer than k keys above it. Candidates below it leave (value -inf, weight 0).
__device__ u32 kth_key_among_candidates(int n, u32 k, SampleShared& sh) {
    const int e = threadIdx.x;
    u32 key = 0xffffffffu;
    if (e < n) {
        const u32 own = sh.cand_key[e];
        u32 above = 0;
#pragma unroll 8
        for (int j = 0; j < n; ++j) above += sh.cand_key[j] > own;
        if (above < k) key = sh.cand_key[e];
    }
    // An int minimum orders u32 keys once their top bit is flipped.
    const u32 kth = (u32)block_min_int((int)(key ^ 0x80000000u), sh) ^ 0x80000000u;
    if (e < n && sh.cand_key[e] < kth) {
        sh.cand_val[e] = NEG_INF;
        sh.cand_w[e] = 0.0f;
    }
    __syncthreads();
    return kth;
}

// Kept: not -inf, key of x at least keep_key (top-k, in x's order: the temperature keeps it), s = x / temperature
// at least floor (min-p) and key of s at least s_key (the top-p threshold where it was bisected).
struct Keep {
    float temperature, max_scaled, floor;
    u32 keep_key, s_key;
    __device__ bool weight(float v, float& w) const {
        if (v == NEG_INF || order_key(v) < keep_key) return false;
        const float s = v / temperature;
        if (s < floor || order_key(s) < s_key) return false;
        w = expf(s - max_scaled);
        return true;
    }
};

__device__ float kept_mass(const float* x, int vocab, const Keep& keep, SampleShared& sh, const u32* allowed) {
    float sum = 0.0f, w;
    scan_row(x, vocab, [&](float v, int, bool valid) {
        if (valid && keep.weight(v, w)) sum += w;
    }, allowed);
    return block_sum(sum, sh.f);
}

// Inverse transform in vocabulary order over the kept values: each thread sums a contiguous chunk, the block
// scans the sums, the thread whose chunk holds the target walks it again.
__device__ int sample_over_row(const float* x, int vocab, const Keep& keep, float u, SampleShared& sh,
                               const u32* allowed) {
    const int chunk = (((vocab + blockDim.x - 1) / blockDim.x) + 3) & ~3;   // whole 16-byte groups
    const int begin = min(vocab, (int)threadIdx.x * chunk), end = min(vocab, begin + chunk);
    float own = 0.0f, w;
    int last_kept = -1;
    scan_chunk(x, begin, end, [&](float v, int i) {
        if (keep.weight(v, w)) {
            own += w;
            last_kept = i;
        }
    }, allowed);
    const float before = block_prefix_exclusive(own, sh.f);
    const float total = block_sum(own, sh.f);
    const float target = u * total;
    const int holder = block_min_int(before + own > target ? (int)threadIdx.x : 0x7fffffff, sh);
    if (threadIdx.x == holder) {
        float cumulative = before;
        int chosen = -1;
        scan_chunk(x, begin, end, [&](float v, int i) {
            if (chosen < 0 && keep.weight(v, w)) {
                cumulative += w;
                if (cumulative > target) chosen = i;
            }
        }, allowed);
        sh.chosen = chosen;
    }
    __syncthreads();
    const int last = block_max_int(last_kept, sh);
    const int chosen = holder == 0x7fffffff ? -1 : sh.chosen;
    // u can be 1 (cuRAND's range is (0, 1]) and sums round: then the last token with mass, as the reference.
    return chosen >= 0 ? chosen : max(last, 0);
}

// Top-p over the n candidates in shared memory (any order): the largest value at which the mass from the top
// reaches top_p * total (ties kept); then the inverse transform over the kept ones in vocabulary order. Each
// thread walks all n (a few hundred for top-k 50 over 128k logits): unrolled, so its shared loads overlap.
__device__ int sample_candidates(int n, float top_p, float total, float u, SampleShared& sh) {
    const int e = threadIdx.x;
    const bool mine = e < n;
    const float val = mine ? sh.cand_val[e] : NEG_INF;
    const int idx = mine ? sh.cand_idx[e] : 0x7fffffff;
    if (threadIdx.x == 0) sh.threshold = NEG_INF;
    __syncthreads();
    if (top_p < 1.0f) {
        const float target = top_p * total;
        float above = 0.0f, tied = 0.0f, smallest = POS_INF;
        if (mine) {
#pragma unroll 8
            for (int j = 0; j < n; ++j) {
                const float v = sh.cand_val[j];
                if (v > val) above += sh.cand_w[j];
                else if (v == val) tied += sh.cand_w[j];
                smallest = fminf(smallest, v);
            }
            if (above < target && target <= above + tied) sh.threshold = val;   // equal values: a benign race
        }
        __syncthreads();
        // Sums in another order than the reference can leave no value crossing when top_p is near 1: keep all.
        if (threadIdx.x == 0 && sh.threshold == NEG_INF) sh.threshold = smallest;
        __syncthreads();
    }
    const float threshold = sh.threshold;
    const bool kept = mine && val != NEG_INF && val >= threshold;   // -inf: dropped by the exact top-k
    float before = 0.0f, own = kept ? sh.cand_w[e] : 0.0f;
    if (kept)
#pragma unroll 8
        for (int j = 0; j < n; ++j)
            if (sh.cand_val[j] >= threshold && sh.cand_idx[j] < idx) before += sh.cand_w[j];
    const float kept_total = block_sum(own, sh.f);
    const float target = u * kept_total;
    const int chosen = block_min_int(kept && before + own > target ? idx : 0x7fffffff, sh);
    if (chosen != 0x7fffffff) return chosen;
    return max(block_max_int(kept ? idx : -1, sh), 0);
}

// tokens[row] for every row. Per-row parameters are device tensors: top_k <= 0 means off, top_p 1 and
// min_p 0 likewise; temperature < GREEDY_TEMPERATURE is greedy. Top-k and top-p select in the order of the
// logits themselves (the temperature keeps it); only kept values are divided and exponentiated. `bitmasks`
// ([rows, bitmask_stride] words, or nullptr) are the grammars' allowed tokens, applied before everything.
__global__ void __launch_bounds__(SAMPLE_THREADS, 1) sample_tokens(
        i64* __restrict__ tokens, const float* __restrict__ logits, i64 logits_stride, int vocab,
        const float* __restrict__ temperatures, const i64* __restrict__ top_ks, const float* __restrict__ top_ps,
        const float* __restrict__ min_ps, const u64* __restrict__ seeds, const i64* __restrict__ positions,
        const u32* __restrict__ bitmasks, i64 bitmask_stride) {
    __shared__ SampleShared sh;
    const int row = blockIdx.x;
    const float* x = logits + row * logits_stride;
    const u32* allowed = bitmasks == nullptr ? nullptr : bitmasks + row * bitmask_stride;
    const float temperature = temperatures[row], top_p = top_ps[row], min_p = min_ps[row];
    const i64 top_k = top_ks[row];
    const bool greedy = temperature < GREEDY_TEMPERATURE;
    const bool use_top_k = top_k > 0 && top_k < vocab, use_top_p = top_p < 1.0f;
    const bool small_k = use_top_k && top_k <= CANDIDATES;
    // The level-1 histogram of the first selection is built in the pass that finds the maximum.
    const bool histogram = !greedy && (use_top_k || (use_top_p && vocab > CANDIDATES));

    for (int b = threadIdx.x; b < BINS; b += blockDim.x) sh.hist[b] = 0;
    __syncthreads();
    float best = NEG_INF;
    int best_index = 0x7fffffff;
    scan_row(x, vocab, [&](float v, int i, bool valid) {
        if (v > best) {   // a thread meets its indices in increasing order: the first maximum wins ties
            best = v;
            best_index = i;
        }
        if (histogram) histogram_add(valid ? order_key(v) >> 21 : NO_BIN, sh.hist);
    }, allowed);
    __syncthreads();
    block_argmax(best, best_index, sh);
    // Greedy rows, and rows without a finite maximum (all -inf: token 0; +inf: the first of them).
    if (greedy || best == NEG_INF || best == POS_INF) {
        if (threadIdx.x == 0) tokens[row] = best == NEG_INF ? 0 : best_index;
        return;
    }
    Keep keep{temperature, best / temperature, NEG_INF, 0u, 0u};
    // min-p keeps s >= max + log(min_p) (log computed in double, as the reference's math.log).
    if (min_p > 0.0f) keep.floor = keep.max_scaled + (float)log((double)min_p);
    const float u = philox_uniform(seeds[row], (u64)positions[row]);
    // A small top-k whose level-1 bin, with the bins above it, fits the candidates: collect those in one pass and
    // finish the selection in shared memory, two passes over the row fewer than the radix select.
    bool select_among_candidates = false;
    if (small_k) {
        find_rank_bin(BINS, (u32)top_k, sh);
        const u32 bin = sh.bin;
        select_among_candidates = sh.above + sh.hist[bin] <= CANDIDATES;
        __syncthreads();
        keep.keep_key = select_among_candidates ? bin << 21 : kth_largest_key(x, vocab, (u32)top_k, true, sh, allowed);
    } else if (use_top_k) {
        keep.keep_key = kth_largest_key(x, vocab, (u32)top_k, true, sh, allowed);
    }
    int token;
    if (!use_top_p && !small_k) {
        token = sample_over_row(x, vocab, keep, u, sh, allowed);
    } else {
        // Candidates: the kept values when top-k is small, else the CANDIDATES largest (top-p's nucleus).
        u32 candidate_key = keep.keep_key;
        if (!small_k && vocab > CANDIDATES)
            candidate_key = max(candidate_key, kth_largest_key(x, vocab, CANDIDATES, !use_top_k, sh, allowed));
        if (threadIdx.x == 0) sh.count = 0;
        __syncthreads();
        float total = 0.0f;
        scan_row(x, vocab, [&](float v, int i, bool valid) {
            const bool candidate = valid && order_key(v) >= candidate_key;
            float w;
            // Top-k rows need only the candidates; top-p rows also the mass of everything kept.
            if (valid && (candidate || !small_k) && keep.weight(v, w)) {
                total += w;
                if (candidate) {
                    const int slot = atomicAdd(&sh.count, 1);
                    if (slot < CANDIDATES) {
                        sh.cand_val[slot] = v / temperature;
                        sh.cand_key[slot] = order_key(v);
                        sh.cand_w[slot] = w;
                        sh.cand_idx[slot] = i;
                    }
                }
            }
        }, allowed);
        total = block_sum(total, sh.f);
        const int n = sh.count;
        if (select_among_candidates) kth_key_among_candidates(n, (u32)top_k, sh);
        float candidate_mass = threadIdx.x < min(n, CANDIDATES) ? sh.cand_w[threadIdx.x] : 0.0f;
        candidate_mass = block_sum(candidate_mass, sh.f);
        // Resolved when every kept value fits (ties at the k-th can overflow) and holds the nucleus.
        if (n <= CANDIDATES && (small_k || candidate_mass >= top_p * total)) {
            token = sample_candidates(n, use_top_p ? top_p : 1.0f, small_k ? candidate_mass : total, u, sh);
        } else {
            // A flat nucleus: bisect for the largest key of s whose mass from the top reaches top_p * total.
            u32 lo = 0, hi = order_key(keep.max_scaled);
            const float target = (use_top_p ? top_p : 1.0f) * total;
            while (lo < hi) {
                const u32 mid = lo + (hi - lo + 1) / 2;
                Keep probe = keep;
                probe.s_key = mid;
                if (kept_mass(x, vocab, probe, sh, allowed) >= target) lo = mid;
                else hi = mid - 1;
            }
            keep.s_key = lo;
            token = sample_over_row(x, vocab, keep, u, sh, allowed);
        }
    }
    if (threadIdx.x == 0) tokens[row] = token;
}

// Logprobs from the raw logits (vLLM V1's default): the chosen token's, and the top n (num_top[row] >= 0;
// rows with -1 are skipped). top_ids / top_logprobs are [rows, max_top].
__global__ void __launch_bounds__(SAMPLE_THREADS, 1) token_logprobs(
        float* __restrict__ chosen_logprobs, int* __restrict__ top_ids, float* __restrict__ top_logprobs,
        int max_top, const float* __restrict__ logits, i64 logits_stride, int vocab, const i64* __restrict__ tokens,
        const int* __restrict__ num_top) {
    __shared__ SampleShared sh;
    const int row = blockIdx.x, n = min(num_top[row], vocab);
    if (n < 0) return;
    const float* x = logits + row * logits_stride;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, x[i]);   // raw: NaN stays NaN
    m = block_max(m, sh.f);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += expf(x[i] - m);
    const float lse = m + logf(block_sum(sum, sh.f));
    if (threadIdx.x == 0) chosen_logprobs[row] = x[tokens[row]] - lse;
    if (n == 0) return;
    // The n largest: everything at or above the n-th largest value, ranked by value, then index.
    const u32 threshold = kth_largest_key(x, vocab, (u32)n, false, sh);
    if (threadIdx.x == 0) sh.count = 0;
    __syncthreads();
    scan_row(x, vocab, [&](float v, int i, bool valid) {
        if (valid && order_key(v) >= threshold) {
            const int slot = atomicAdd(&sh.count, 1);
            if (slot < TOP_MAX) {
                sh.cand_val[slot] = v;
                sh.cand_idx[slot] = i;
            }
        }
    });
    __syncthreads();
    const int found = min(sh.count, TOP_MAX);
    if ((int)threadIdx.x < found) {
        const float v = sh.cand_val[threadIdx.x];
        const int idx = sh.cand_idx[threadIdx.x];
        int rank = 0;
        for (int j = 0; j < found; ++j) {
            const float w = sh.cand_val[j];
            rank += w > v || (w == v && sh.cand_idx[j] < idx);
        }
        if (rank < n) {
            top_ids[row * max_top + rank] = idx;
            top_logprobs[row * max_top + rank] = v - lse;
        }
    }
}
