// Batched next-token sampling: one thread block per row of logits [rows, vocab] (f32), only the
// chosen ids come back. The CPU twin (the reference the selftest compares against, bit for bit)
// is `sample_row_reference` in src/engine/sampling_op.rs; keep the two in step.
//
// Inputs, per row r: temperature f32, top_k u32, top_p f32, u f32 in [0, 1); output u32 [rows].
//
// Pseudocode, per row r (`key(x)` = the order-preserving uint32 encoding of a float:
// bits ^ (sign ? 0xffffffff : 0x80000000), so x < y  <=>  key(x) < key(y)):
//   1. t = temperature[r]; if !(t >= FLT_MIN) (t <= 0, subnormal or NaN):
//          return argmax_i logit_i  (first index on ties; NaN counts as -inf)
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
//      approximation: __fmul_rn / __fmaf_rn / __fdiv_rn), so the CPU twin gets the same bits;
//      masses are integers, so sums are exact, order-free and deterministic.
//   5. top-p (p = top_p[r]; p >= 1, p < FLT_MIN (0, subnormal, NaN) or Z == 0 = off): need = (f64) p * (f64) Z;
//      tau_p = the largest key among kept values with (f64) sum_{kept, x_i >= tau_p} w_i >= need
//      (radix select over key(x) as in 3, 256-bin mass histograms); keep x_i >= tau_p.
//      (= sort descending, keep the shortest prefix with mass >= p, ties kept together.)
//   6. Z' = sum of kept w; target = (u64) trunc((f64) u[r] * (f64) Z');
//      walk i in index order accumulating kept w_i (chunked block-wide prefix scan); the
//      sample is the first i whose running sum exceeds target; if none (Z' == 0, or u >= 1):
//      the last kept i.
//
// Cost: one pass over the row for the max, 4 for top-k, 4 for top-p (only when on), one for Z
// when top-p is off, and up to one for the walk (it stops at the sample). The row is re-read
// each pass (from L2: a 128K-entry row is 512 KB); nothing is written but the id.
#include <stdint.h>

#define BLOCK 1024
#define WARPS (BLOCK / 32)
#define ITEMS 8  // contiguous elements per thread per chunk of the final walk
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

// x_i of step 2.
__device__ __forceinline__ float scaled(float logit, float t) { return clean(__fdiv_rn(clean(logit), t)); }

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

// Adds `v` to bin `bin`, merging runs of one bin per thread (the top digits of most values
// agree, so this spares most shared-memory atomics on hot bins).
struct RunAdd {
    uint32_t bin = FULL;
    uint64_t acc = 0;
    __device__ __forceinline__ void add(uint64_t* hist, uint32_t b, uint64_t v) {
        if (b != bin) {
            if (acc) atomicAdd((unsigned long long*)&hist[bin], (unsigned long long)acc);
            bin = b;
            acc = 0;
        }
        acc += v;
    }
    __device__ __forceinline__ void flush(uint64_t* hist) {
        if (acc) atomicAdd((unsigned long long*)&hist[bin], (unsigned long long)acc);
    }
};

// Warp 0 picks the digit of one radix pass: bins are scanned from 255 down, `above` is the
// weight of keys above the current prefix range; the chosen digit d is the first (highest)
// with pick(above + weight of bins d..255). Writes the digit, the weight of the bins above d
// and the weight of bin d (and, for `total`, the weight of all bins) to shared memory.
template <bool MASS>
__device__ __forceinline__ void pick_digit(const uint64_t* hist, uint64_t above, uint64_t want, double need,
                                           uint32_t* s_digit, uint64_t* s_above, uint64_t* s_bin,
                                           uint64_t* s_total) {
    const uint32_t lane = threadIdx.x & 31;
    uint64_t c[8], s = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        c[j] = hist[255 - (lane * 8 + j)];
        s += c[j];
    }
    uint64_t incl = s;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        uint64_t y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    uint64_t total = __shfl_sync(FULL, incl, 31);
    if (MASS && s_total != nullptr) need = need * (double)total;  // first mass pass: need = p * Z
    uint64_t cum = above + (incl - s);
    int found = -1;
    uint64_t f_above = 0, f_bin = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
        bool ok = MASS ? (c[j] > 0 && (double)(cum + c[j]) >= need) : (cum + c[j] >= want);
        if (found < 0 && ok) {
            found = j;
            f_above = cum;
            f_bin = c[j];
        }
        cum += c[j];
    }
    uint32_t ball = __ballot_sync(FULL, found >= 0);
    int src = ball ? __ffs(ball) - 1 : 31;
    uint32_t digit = found >= 0 ? 255 - (lane * 8 + found) : 0;
    if (!ball && lane == 31) {  // unreachable by the invariant; take the lowest bin
        f_above = cum - c[7];
        f_bin = c[7];
    }
    digit = __shfl_sync(FULL, digit, src);
    f_above = __shfl_sync(FULL, f_above, src);
    f_bin = __shfl_sync(FULL, f_bin, src);
    if (lane == 0) {
        *s_digit = digit;
        *s_above = f_above;
        *s_bin = f_bin;
        if (s_total != nullptr) *s_total = total;
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK)
    sample_rows(uint32_t* __restrict__ out, const float* __restrict__ logits, const float* __restrict__ temperature,
                const uint32_t* __restrict__ top_k, const float* __restrict__ top_p, const float* __restrict__ uniform,
                uint32_t vocab) {
    __shared__ uint64_t hist[256];
    __shared__ uint64_t red[WARPS];
    __shared__ uint32_t s_digit, s_found;
    __shared__ uint64_t s_above, s_bin, s_total;

    const uint32_t row = blockIdx.x, tid = threadIdx.x;
    const float* x = logits + (size_t)row * vocab;
    const float t = temperature[row];

    // 1. greedy: the largest key(v), v = logit with NaN -> -inf and -0 -> +0; lowest index on ties.
    if (!(t >= 1.17549435e-38f)) {
        uint64_t best = 0;
#pragma unroll 4
        for (uint32_t i = tid; i < vocab; i += BLOCK) {
            uint32_t b = __float_as_uint(x[i]);
            if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu)) b = 0xff800000u;  // NaN
            if ((b & 0x7fffffffu) == 0) b = 0;                                         // -0
            uint64_t c = ((uint64_t)f2key(__uint_as_float(b)) << 32) | (uint64_t)(FULL - i);
            best = c > best ? c : best;
        }
        best = block_max_u64(best, red);
        if (tid == 0) out[row] = FULL - (uint32_t)best;
        return;
    }

    // 2. the max of x.
    uint64_t mk = 0;
#pragma unroll 4
    for (uint32_t i = tid; i < vocab; i += BLOCK) {
        uint64_t k = f2key(scaled(x[i], t));
        mk = k > mk ? k : mk;
    }
    const uint32_t max_key = (uint32_t)block_max_u64(mk, red);
    const float m = key2f(max_key);

    // 3. top-k: the k-th largest key.
    uint32_t tau = NEG_INF_KEY;  // key(-inf): every cleaned x is >= it
    const uint32_t k = top_k[row];
    if (k > 0 && k < vocab) {
        uint32_t prefix = 0, mask = 0;
        uint64_t above = 0;
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist[tid] = 0;
            __syncthreads();
            RunAdd run;
#pragma unroll 4
            for (uint32_t i = tid; i < vocab; i += BLOCK) {
                uint32_t key = f2key(scaled(x[i], t));
                if ((key & mask) == prefix) run.add(hist, (key >> shift) & 255u, 1);
            }
            run.flush(hist);
            __syncthreads();
            if (tid < 32) pick_digit<false>(hist, above, k, 0.0, &s_digit, &s_above, &s_bin, nullptr);
            __syncthreads();
            prefix |= s_digit << shift;
            mask |= 0xffu << shift;
            above = s_above;
            __syncthreads();
        }
        tau = prefix;
    }

    // 4 and 5: Z, top-p, Z'.
    uint64_t zp = 0;
    const float p = top_p[row];
    if (p >= 1.17549435e-38f && p < 1.0f) {
        uint32_t prefix = 0, mask = 0;
        uint64_t above = 0;
        double need = (double)p;  // times Z once the first pass has summed it
        bool off = false;
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist[tid] = 0;
            __syncthreads();
            RunAdd run;
#pragma unroll 4
            for (uint32_t i = tid; i < vocab; i += BLOCK) {
                float xi = scaled(x[i], t);
                uint32_t key = f2key(xi);
                if (key >= tau && (key & mask) == prefix) run.add(hist, (key >> shift) & 255u, wfix(clean(__fsub_rn(xi, m))));
            }
            run.flush(hist);
            __syncthreads();
            if (tid < 32) pick_digit<true>(hist, above, 0, need, &s_digit, &s_above, &s_bin, shift == 24 ? &s_total : nullptr);
            __syncthreads();
            if (shift == 24) {
                need = (double)p * (double)s_total;
                if (s_total == 0) off = true;  // every kept weight is 0 (all -inf): skip top-p
            }
            if (off) break;
            prefix |= s_digit << shift;
            mask |= 0xffu << shift;
            above = s_above;
            zp = s_above + s_bin;
            __syncthreads();
        }
        if (off) {
            zp = 0;
        } else {
            tau = prefix;
        }
    } else {
        uint64_t z = 0;
#pragma unroll 4
        for (uint32_t i = tid; i < vocab; i += BLOCK) {
            float xi = scaled(x[i], t);
            if (f2key(xi) >= tau) z += wfix(clean(__fsub_rn(xi, m)));
        }
        zp = block_sum_u64(z, red);
    }

    // 6. the first index whose running kept mass exceeds target.
    const uint64_t target = (uint64_t)((double)uniform[row] * (double)zp);
    if (tid == 0) s_found = FULL;
    __syncthreads();
    const uint32_t lane = tid & 31, warp = tid >> 5;
    uint64_t carry = 0;
    for (uint32_t base = 0; base < vocab; base += BLOCK * ITEMS) {
        const uint32_t start = base + tid * ITEMS;
        uint64_t w[ITEMS], local = 0;
#pragma unroll
        for (int j = 0; j < ITEMS; j++) {
            w[j] = 0;
            if (start + j < vocab) {
                float xi = scaled(x[start + j], t);
                if (f2key(xi) >= tau) w[j] = wfix(clean(__fsub_rn(xi, m)));
            }
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
                    atomicMin(&s_found, start + j);
                    break;
                }
            }
        }
        __syncthreads();
        if (s_found != FULL) break;
        carry += chunk;
    }
    if (s_found != FULL) {
        if (tid == 0) out[row] = s_found;
        return;
    }
    // No running sum exceeded target: the last kept index.
    uint64_t last = 0;
    for (uint32_t i = tid; i < vocab; i += BLOCK) {
        if (f2key(scaled(x[i], t)) >= tau) last = (uint64_t)i + 1;
    }
    last = block_max_u64(last, red);
    if (tid == 0) out[row] = last ? (uint32_t)(last - 1) : 0;
}
