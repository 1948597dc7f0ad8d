// Batched next-token sampling: one thread block per row of logits [rows, vocab] (f32), only the
// chosen ids come back. The CPU twin (the reference the selftest compares against, bit for bit)
// is `sample_row_reference` in src/engine/sampling_op.rs; keep the two in step.
//
// Inputs, per row r: temperature f32, top_k u32, top_p f32, u f32 in [0, 1); output u32 [rows].
// Scratch: u32 [rows, stride] (stride = vocab rounded up to a multiple of 4) holding key(x_i).
//
// Pseudocode, per row r (`key(x)` = the order-preserving uint32 encoding of a float:
// bits ^ (sign ? 0xffffffff : 0x80000000), so x < y  <=>  key(x) < key(y)):
//   1. t = temperature[r]; if !(t >= FLT_MIN) (t <= 0, subnormal or NaN):
//          return argmax_i logit_i  (first index on ties; NaN counts as -inf, -0 as +0)
//   2. x_i = clean(clean(logit_i) / t)      clean: NaN -> -inf, zero or subnormal -> +0
//      m   = max_i x_i
//   3. top-k (k = top_k[r]; 0 or >= vocab = off): tau_k = the exact k-th largest x
//      (radix select over key(x): 4 passes of 8 bits, each a 256-bin count histogram of the
//      values matching the digits chosen so far; the same answer as 32 bisection passes);
//      keep x_i >= tau_k (ties at the threshold all kept). Off: tau_k = -inf (all kept).
//   4. w_i = W(d_i), d_i = clean(x_i - m), for kept i;  Z = sum w_i (exact, u64)
//      W(d) = exp(d) in 2^-40 fixed point, truncated: 0 when !(d >= -30); else
//             k = rint(d * log2 e), r = d - k ln2 (Cody-Waite, two fmas),
//             p = degree-7 Taylor polynomial of exp(r) (Horner, fmas),
//             W = (u64) trunc(p * 2^(k + 40))
//      Every step is one IEEE-rounded f32 operation (no contraction, no fast-math
//      approximation: __fmul_rn / __fmaf_rn / __fdiv_rn; their .ftz flushes subnormal results,
//      which the twin does too), so the CPU twin gets the same bits; masses are integers, so
//      sums are exact, order-free and deterministic.
//   5. top-p (p = top_p[r]; p >= 1, p < FLT_MIN (0, subnormal, NaN) or Z == 0 = off):
//      need = (f64) p * (f64) Z;
//      tau_p = the largest key among kept values with (f64) sum_{kept, x_i >= tau_p} w_i >= need
//      (radix select over key(x) as in 3, with 256-bin mass histograms); keep x_i >= tau_p.
//      (= sort descending, keep the shortest prefix with mass >= p, ties kept together.)
//   6. Z' = sum of kept w; target = (u64) trunc((f64) u * (f64) Z'), u = u[r] (NaN or < 0: 0);
//      walk i in index order accumulating kept w_i (chunked block-wide prefix scan); the
//      sample is the first i whose running sum exceeds target; if none (Z' == 0, or u >= 1):
//      the last kept i.
//
// Cost: pass 1 reads the logits (16-byte loads) and writes the keys; every later pass reads the
// keys (L2-resident: 512 KB for a 128K row): 4 for top-k, 4 for top-p (each only when on), one
// for Z when top-p is off (it also sums each walk chunk, so the walk then scans one chunk), and
// up to one for the walk (it stops at the sample). Histograms are
// 32-bit shared-memory atomics (counts; masses as a low word with carry into a high word), in
// NH copies to spread contention. H200, 33 rows x 128256: mixed kinds 200 us, greedy 19 us,
// temperature alone 80 us, top-k 50 125 us, top-p 0.9 190 us per launch (1 row: about the same).
#include <stdint.h>

#define BLOCK 1024
#define WARPS (BLOCK / 32)
#define ITEMS 8  // contiguous elements per thread per chunk of the walk (two 16-byte loads)
#define CHUNK (BLOCK * ITEMS)
#define MAX_CHUNKS 64  // chunk sums kept for the walk (vocab <= 524288)
#define UNROLL 4 // 16-byte loads in flight per thread in a pass
#define NH 4     // histogram copies (warp % NH)
#define FULL 0xffffffffu
#define NEG_INF_KEY 0x007fffffu  // key(-inf)

__device__ __forceinline__ uint32_t f2key(float x) {
    uint32_t b = __float_as_uint(x);
    return b ^ ((b & 0x80000000u) ? 0xffffffffu : 0x80000000u);
}
__device__ __forceinline__ float key2f(uint32_t k) {
    return __uint_as_float(k ^ ((k & 0x80000000u) ? 0x80000000u : 0xffffffffu));
}

// NaN -> -inf; zero (either sign) and subnormals -> +0; everything else unchanged.
__device__ __forceinline__ float clean(float x) {
    uint32_t b = __float_as_uint(x), e = b & 0x7f800000u;
    if (e == 0) return 0.0f;
    if (e == 0x7f800000u && (b & 0x007fffffu)) return __uint_as_float(0xff800000u);
    return x;
}

// key(x_i) of step 2.
__device__ __forceinline__ uint32_t scaled_key(float logit, float t) {
    return f2key(clean(__fdiv_rn(clean(logit), t)));
}

// W(d) of step 4: exp(d) in 2^-40 fixed point.
__device__ __forceinline__ uint64_t wfix(float d) {
    if (!(d >= -30.0f)) return 0;
    float k = rintf(__fmul_rn(d, __uint_as_float(0x3fb8aa3bu)));  // log2 e
    float r = __fmaf_rn(k, -__uint_as_float(0x3f318000u), d);    // ln2 hi
    r = __fmaf_rn(k, -__uint_as_float(0xb95e8083u), r);          // ln2 lo (negative)
    float p = __uint_as_float(0x39500d01u);                      // 1/5040
    p = __fmaf_rn(p, r, __uint_as_float(0x3ab60b61u));           // 1/720
    p = __fmaf_rn(p, r, __uint_as_float(0x3c088889u));           // 1/120
    p = __fmaf_rn(p, r, __uint_as_float(0x3d2aaaabu));           // 1/24
    p = __fmaf_rn(p, r, __uint_as_float(0x3e2aaaabu));           // 1/6
    p = __fmaf_rn(p, r, 0.5f);
    p = __fmaf_rn(p, r, 1.0f);
    p = __fmaf_rn(p, r, 1.0f);
    int e = (int)k + 40;  // in [-3, 40]: 2^e is a normal float, the product exact
    return __float2ull_rz(__fmul_rn(p, __uint_as_float((uint32_t)(e + 127) << 23)));
}

// The weight of key `key` (a kept x): W(clean(x - m)).
__device__ __forceinline__ uint64_t weight(uint32_t key, float m) { return wfix(clean(__fsub_rn(key2f(key), m))); }

// Block-wide reductions; every thread gets the result. `red` is WARPS entries of shared memory.
__device__ __forceinline__ uint64_t block_max_u64(uint64_t v, uint64_t* red) {
    for (int o = 16; o > 0; o >>= 1) {
        uint64_t y = __shfl_xor_sync(FULL, v, o);
        v = y > v ? y : v;
    }
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = red[0];
    for (int w = 1; w < WARPS; w++) v = red[w] > v ? red[w] : v;
    __syncthreads();
    return v;
}
__device__ __forceinline__ uint64_t block_sum_u64(uint64_t v, uint64_t* red) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    v = 0;
    for (int w = 0; w < WARPS; w++) v += red[w];
    __syncthreads();
    return v;
}

// Calls f(i, key_i) for every i in [0, vocab) of a key row (16-byte aligned), UNROLL 16-byte
// loads in flight per thread.
template <typename F>
__device__ __forceinline__ void for_keys(const uint32_t* __restrict__ keys, uint32_t vocab, F f) {
    const uint4* v = reinterpret_cast<const uint4*>(keys);
    const uint32_t nv = vocab / 4;
    for (uint32_t j0 = threadIdx.x; j0 < nv; j0 += BLOCK * UNROLL) {
        uint4 q[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j0 + u * BLOCK;
            if (j < nv) q[u] = v[j];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j0 + u * BLOCK;
            if (j < nv) {
                f(4 * j, q[u].x);
                f(4 * j + 1, q[u].y);
                f(4 * j + 2, q[u].z);
                f(4 * j + 3, q[u].w);
            }
        }
    }
    const uint32_t i = 4 * nv + threadIdx.x;
    if (i < vocab) f(i, keys[i]);
}

// Calls f(i, logit_i) for every i in [0, vocab) of a logits row (4-byte aligned): scalar loads
// up to the first 16-byte boundary, then UNROLL 16-byte loads in flight per thread.
template <typename F>
__device__ __forceinline__ void for_logits(const float* __restrict__ x, uint32_t vocab, F f) {
    uint32_t head = (uint32_t)((16 - ((uintptr_t)x & 15)) & 15) / 4;
    head = head < vocab ? head : vocab;
    if (threadIdx.x < head) f(threadIdx.x, x[threadIdx.x]);
    const float4* v = reinterpret_cast<const float4*>(x + head);
    const uint32_t nv = (vocab - head) / 4;
    for (uint32_t j0 = threadIdx.x; j0 < nv; j0 += BLOCK * UNROLL) {
        float4 q[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j0 + u * BLOCK;
            if (j < nv) q[u] = v[j];
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            uint32_t j = j0 + u * BLOCK;
            if (j < nv) {
                uint32_t i = head + 4 * j;
                f(i, q[u].x);
                f(i + 1, q[u].y);
                f(i + 2, q[u].z);
                f(i + 3, q[u].w);
            }
        }
    }
    const uint32_t i = head + 4 * nv + threadIdx.x;
    if (i < vocab) f(i, x[i]);
}

// 256-bin histograms in shared memory, NH copies: counts, or masses as lo (mod 2^32) + hi words.
struct Hist {
    uint32_t lo[NH][256];
    uint32_t hi[NH][256];
};

__device__ __forceinline__ void hist_clear(Hist& h) {
    for (uint32_t i = threadIdx.x; i < NH * 256; i += BLOCK) {
        (&h.lo[0][0])[i] = 0;
        (&h.hi[0][0])[i] = 0;
    }
}

// Adds `v` (a count or a mass) to bin `bin` of this warp's copy; exact: a carry out of the low
// word is seen by exactly the thread whose add wrapped it.
__device__ __forceinline__ void hist_add(Hist& h, uint32_t bin, uint64_t v) {
    const uint32_t c = (threadIdx.x >> 5) % NH;
    const uint32_t vlo = (uint32_t)v;
    uint32_t vhi = (uint32_t)(v >> 32);
    const uint32_t old = atomicAdd(&h.lo[c][bin], vlo);
    if ((uint32_t)(old + vlo) < old) vhi += 1;
    if (vhi) atomicAdd(&h.hi[c][bin], vhi);
}

__device__ __forceinline__ uint64_t hist_bin(const Hist& h, uint32_t bin) {
    uint64_t s = 0;
#pragma unroll
    for (int c = 0; c < NH; c++) s += ((uint64_t)h.hi[c][bin] << 32) + h.lo[c][bin];
    return s;
}

// Warp 0 picks the digit of one radix pass: bins are scanned from 255 down; `above` is the
// weight of keys above the current prefix range; the chosen digit d is the highest non-empty
// bin with above + weight(bins d..255) >= want (counts) or, as f64, >= need (masses). For the
// first mass pass (`first`), need = need * (f64) total, total = the weight of all bins.
// Writes the digit, the new `above` (weight above bin d), the weight of bin d, and the total.
struct Pick {
    uint32_t digit;
    uint64_t above, bin, total;
};

template <bool MASS>
__device__ __forceinline__ void pick_digit(const Hist& h, uint64_t above, uint64_t want, double need, bool first,
                                           Pick* out) {
    const uint32_t lane = threadIdx.x & 31;
    uint64_t c[8], s = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        c[j] = hist_bin(h, 255 - (lane * 8 + j));
        s += c[j];
    }
    uint64_t incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    const uint64_t total = __shfl_sync(FULL, incl, 31);
    if (MASS && first) need = need * (double)total;
    uint64_t cum = above + (incl - s);
    int found = -1;
    uint64_t f_above = 0, f_bin = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        bool ok = c[j] > 0 && (MASS ? ((double)(cum + c[j]) >= need) : (cum + c[j] >= want));
        if (found < 0 && ok) {
            found = j;
            f_above = cum;
            f_bin = c[j];
        }
        cum += c[j];
    }
    const uint32_t ball = __ballot_sync(FULL, found >= 0);
    const int src = ball ? __ffs(ball) - 1 : 31;
    uint32_t digit = found >= 0 ? 255 - (lane * 8 + found) : 0;
    if (!ball && lane == 31) {  // unreachable by the invariant; take the lowest bin
        f_above = cum - c[7];
        f_bin = c[7];
    }
    digit = __shfl_sync(FULL, digit, src);
    f_above = __shfl_sync(FULL, f_above, src);
    f_bin = __shfl_sync(FULL, f_bin, src);
    if (lane == 0) *out = Pick{digit, f_above, f_bin, total};
}

// Keys of the walk's chunk layout: thread t holds elements start..start+ITEMS of chunk c.
__device__ __forceinline__ void chunk_keys(const uint32_t* keys, uint32_t vocab, uint32_t start, uint32_t kk[ITEMS]) {
    if (start + ITEMS <= vocab) {
        const uint4* v = reinterpret_cast<const uint4*>(keys + start);
        uint4 a = v[0], b = v[1];
        kk[0] = a.x, kk[1] = a.y, kk[2] = a.z, kk[3] = a.w, kk[4] = b.x, kk[5] = b.y, kk[6] = b.z, kk[7] = b.w;
    } else {
#pragma unroll
        for (int j = 0; j < ITEMS; j++) kk[j] = start + j < vocab ? keys[start + j] : 0;
    }
}

// Step 6 over chunks c0.. (CHUNK elements each, in index order; `carry` = the kept mass before
// chunk c0): the first index whose running kept mass exceeds target, or FULL. Block-wide.
__device__ __forceinline__ uint32_t walk(const uint32_t* keys, uint32_t vocab, uint32_t tau, float m, uint64_t target,
                                         uint32_t c0, uint64_t carry, uint64_t* red, uint32_t* s_found) {
    const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    if (tid == 0) *s_found = FULL;
    __syncthreads();
    for (uint32_t base = c0 * CHUNK; base < vocab; base += CHUNK) {
        const uint32_t start = base + tid * ITEMS;
        uint32_t kk[ITEMS];
        chunk_keys(keys, vocab, start, kk);
        uint64_t w[ITEMS], local = 0;
#pragma unroll
        for (int j = 0; j < ITEMS; j++) {
            w[j] = (start + j < vocab && kk[j] >= tau) ? weight(kk[j], m) : 0;
            local += w[j];
        }
        uint64_t incl = local;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            uint64_t y = __shfl_up_sync(FULL, incl, o);
            if (lane >= o) incl += y;
        }
        if (lane == 31) red[warp] = incl;
        __syncthreads();
        uint64_t before = 0, chunk = 0;
        for (int v = 0; v < WARPS; v++) {
            uint64_t r = red[v];
            before += (v < (int)warp) ? r : 0;
            chunk += r;
        }
        uint64_t run = carry + before + (incl - local);
        if (run + local > target) {
#pragma unroll
            for (int j = 0; j < ITEMS; j++) {
                run += w[j];
                if (run > target) {
                    atomicMin(s_found, start + j);
                    break;
                }
            }
        }
        __syncthreads();
        if (*s_found != FULL) break;
        carry += chunk;
    }
    const uint32_t found = *s_found;
    __syncthreads();
    return found;
}

extern "C" __global__ void __launch_bounds__(BLOCK)
    sample_rows(uint32_t* __restrict__ out, uint32_t* scratch, const float* __restrict__ logits,
                const float* __restrict__ temperature, const uint32_t* __restrict__ top_k,
                const float* __restrict__ top_p, const float* __restrict__ uniform, uint32_t vocab) {
    __shared__ Hist hist;
    __shared__ uint64_t red[WARPS];
    __shared__ Pick pick;
    __shared__ uint32_t s_found;
    __shared__ uint32_t csum_lo[MAX_CHUNKS], csum_hi[MAX_CHUNKS];  // kept mass per walk chunk

    const uint32_t row = blockIdx.x, tid = threadIdx.x;
    const float* x = logits + (size_t)row * vocab;
    uint32_t* keys = scratch + (size_t)row * ((vocab + 3) & ~3u);
    const float t = temperature[row];

    // 1. greedy: the largest key(v), v = logit with NaN -> -inf and -0 -> +0; lowest index on ties.
    if (!(t >= 1.17549435e-38f)) {
        uint64_t best = 0;
        for_logits(x, vocab, [&](uint32_t i, float l) {
            uint32_t b = __float_as_uint(l);
            if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu)) b = 0xff800000u;  // NaN
            if ((b & 0x7fffffffu) == 0) b = 0;                                         // -0
            uint64_t c = ((uint64_t)f2key(__uint_as_float(b)) << 32) | (uint64_t)(FULL - i);
            best = c > best ? c : best;
        });
        best = block_max_u64(best, red);
        if (tid == 0) out[row] = FULL - (uint32_t)best;
        return;
    }

    // 2. keys of x into scratch, and their max.
    uint32_t mk = 0;
    for_logits(x, vocab, [&](uint32_t i, float l) {
        uint32_t k = scaled_key(l, t);
        keys[i] = k;
        mk = k > mk ? k : mk;
    });
    const float m = key2f((uint32_t)block_max_u64(mk, red));  // also orders the key writes before the reads below

    // 3. top-k: the k-th largest key.
    uint32_t tau = NEG_INF_KEY;  // key(-inf): every cleaned x is >= it
    const uint32_t k = top_k[row];
    if (k > 0 && k < vocab) {
        uint32_t prefix = 0, mask = 0;
        uint64_t above = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            hist_clear(hist);
            __syncthreads();
            for_keys(keys, vocab, [&](uint32_t, uint32_t key) {
                if ((key & mask) == prefix) hist_add(hist, (key >> shift) & 255u, 1);
            });
            __syncthreads();
            if (tid < 32) pick_digit<false>(hist, above, k, 0.0, false, &pick);
            __syncthreads();
            prefix |= pick.digit << shift;
            mask |= 0xffu << shift;
            above = pick.above;
            __syncthreads();
        }
        tau = prefix;
    }

    // 4 and 5: Z, top-p, Z'.
    uint64_t zp = 0;
    const float p = top_p[row];
    const bool top_p_on = p >= 1.17549435e-38f && p < 1.0f;
    const uint32_t nchunks = (vocab + CHUNK - 1) / CHUNK;
    const bool chunked = !top_p_on && nchunks <= MAX_CHUNKS;
    if (top_p_on) {
        uint32_t prefix = 0, mask = 0;
        uint64_t above = 0;
        double need = (double)p;  // times Z once the first pass has summed it
        bool off = false;
        for (int shift = 24; shift >= 0; shift -= 8) {
            hist_clear(hist);
            __syncthreads();
            for_keys(keys, vocab, [&](uint32_t, uint32_t key) {
                if (key >= tau && (key & mask) == prefix) {
                    uint64_t w = weight(key, m);
                    if (w) hist_add(hist, (key >> shift) & 255u, w);
                }
            });
            __syncthreads();
            if (tid < 32) pick_digit<true>(hist, above, 0, need, shift == 24, &pick);
            __syncthreads();
            if (shift == 24) {
                need = (double)p * (double)pick.total;
                off = pick.total == 0;  // every kept weight is 0 (all -inf): skip top-p
            }
            if (off) break;
            prefix |= pick.digit << shift;
            mask |= 0xffu << shift;
            above = pick.above;
            zp = pick.above + pick.bin;
            __syncthreads();
        }
        if (!off) tau = prefix;
    } else if (chunked) {  // Z by chunks of the walk, so the walk can start at the right one
        if (tid < MAX_CHUNKS) csum_lo[tid] = csum_hi[tid] = 0;
        __syncthreads();
        const uint32_t lane = tid & 31;
        for (uint32_t c = 0; c < nchunks; c++) {
            const uint32_t start = c * CHUNK + tid * ITEMS;
            uint32_t kk[ITEMS];
            chunk_keys(keys, vocab, start, kk);
            uint64_t local = 0;
#pragma unroll
            for (int j = 0; j < ITEMS; j++) local += (start + j < vocab && kk[j] >= tau) ? weight(kk[j], m) : 0;
            for (int o = 16; o > 0; o >>= 1) local += __shfl_xor_sync(FULL, local, o);
            if (lane == 0 && local) {
                const uint32_t vlo = (uint32_t)local, old = atomicAdd(&csum_lo[c], vlo);
                const uint32_t vhi = (uint32_t)(local >> 32) + ((uint32_t)(old + vlo) < old ? 1 : 0);
                if (vhi) atomicAdd(&csum_hi[c], vhi);
            }
        }
        __syncthreads();
        for (uint32_t c = 0; c < nchunks; c++) zp += ((uint64_t)csum_hi[c] << 32) + csum_lo[c];
    } else {
        uint64_t z = 0;
        for_keys(keys, vocab, [&](uint32_t, uint32_t key) {
            if (key >= tau) z += weight(key, m);
        });
        zp = block_sum_u64(z, red);
    }

    // 6. the first index whose running kept mass exceeds target.
    float u = uniform[row];
    if (!(u > 0.0f)) u = 0.0f;
    const uint64_t target = (uint64_t)((double)u * (double)zp);
    uint32_t found = FULL;
    if (chunked) {  // start at the chunk where the running mass crosses target
        uint64_t cum = 0;
        for (uint32_t c = 0; c < nchunks; c++) {
            uint64_t s = ((uint64_t)csum_hi[c] << 32) + csum_lo[c];
            if (cum + s > target) {
                found = walk(keys, vocab, tau, m, target, c, cum, red, &s_found);
                break;
            }
            cum += s;
        }
    } else {
        found = walk(keys, vocab, tau, m, target, 0, 0, red, &s_found);
    }
    if (found != FULL) {
        if (tid == 0) out[row] = found;
        return;
    }
    // No running sum exceeded target: the last kept index.
    uint64_t last = 0;
    for_keys(keys, vocab, [&](uint32_t i, uint32_t key) {
        if (key >= tau) last = (uint64_t)i + 1 > last ? (uint64_t)i + 1 : last;
    });
    last = block_max_u64(last, red);
    if (tid == 0) out[row] = last ? (uint32_t)(last - 1) : 0;
}
