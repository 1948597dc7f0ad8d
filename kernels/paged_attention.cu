// Paged attention for decode rows, and the KV-cache write, in place on the block pool.
//
// Layouts (all row-major, contiguous):
//   q          [M_total, H, D]          query rows of the packed batch (after RoPE)
//   k/v cache  [num_blocks * bs, KVH, D] one layer's pool; row = block * bs + pos % bs
//   rows       [M]                       which q row each processed query is (decode rows)
//   tables     block ids of each query's sequence: block b of query m at
//              tables[m * row_stride + b * block_stride] ([M, max_blocks] row-major, or
//              block-major [max_blocks, M] for CUDA graphs, whose used prefix is contiguous)
//   ctx        [M]                       keys the query sees (= its position + 1)
//   out        [M, H, D]
//
// Pseudocode of paged_decode_attention, per query m and query head h (kv head g = h / rep):
//   for j in 0..ctx[m]:
//       r     = tables[m][j / bs] * bs + j % bs
//       s[j]  = scale * dot(q[rows[m], h], k_cache[r, g])
//   p = softmax(s)                              (f32, max-subtracted, online)
//   out[m, h] = sum_j p[j] * v_cache[r_j, g]
//
// Work split (flash-decoding): thread block (m, g, p) handles kv head g of query m over the p-th of
// P equal slices of that query's keys, for the `rep` query heads of g (GQA: each key and value
// row is read once for all of them). Warps stride over the slice's keys two at a time (two rows
// in flight per warp); lanes stride over head dims (lane + 32 i), so a warp reads a key row as
// coalesced 64-byte runs. Each warp keeps an online softmax (max, sum, weighted V) per head; the
// block merges its warps, and with P > 1 writes (acc, max, sum) per head to `part`, which
// paged_decode_merge folds into `out`. P is chosen on the host so that a small batch still
// fills the GPU's multiprocessors.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "pdl.cuh"

#define MAX_WARPS 8
// Template parameters, since registers scale with them: MAX_NPL = head dims per lane (D / 32
// rounded up to 1, 2, 4 or 8) and MAX_REP = query heads per kv head at most (4 or 8).


template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
    T v[N];
};

template <int N>
struct Floats {
    float v[N];
};

// Dims [d0, d0 + N) of a row as floats (returned by value, so they stay in registers): one
// vector load when all are inside the row.
template <typename T, int N>
__device__ __forceinline__ Floats<N> load_dims(const T* __restrict__ row, uint32_t d0, uint32_t D) {
    Floats<N> f;
    if (d0 + N <= D) {
        Pack<T, N> p = *reinterpret_cast<const Pack<T, N>*>(row + d0);
#pragma unroll
        for (int i = 0; i < N; i++) f.v[i] = to_f(p.v[i]);
    } else {
#pragma unroll
        for (int i = 0; i < N; i++) f.v[i] = (d0 + i < D) ? to_f(row[d0 + i]) : 0.f;
    }
    return f;
}

template <typename T, int MAX_NPL, int MAX_REP>
__device__ void paged_decode_attention(
    T* __restrict__ out, float* __restrict__ part, const T* __restrict__ q, const T* __restrict__ kc,
    const T* __restrict__ vc, const uint32_t* __restrict__ rows, const uint32_t* __restrict__ tables,
    const uint32_t* __restrict__ ctx, uint32_t row_stride, uint32_t block_stride, uint32_t bs, uint32_t H, uint32_t KVH, uint32_t D,
    float scale) {
    pdl_trigger();  // a skinny GEMM may follow (pdl.cuh)
    const uint32_t m = blockIdx.x, g = blockIdx.y, p = blockIdx.z, P = gridDim.z;
    const uint32_t warps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t rep = H / KVH;
    const uint32_t d0 = lane * MAX_NPL;
    const uint32_t n = ctx[m];
    const uint32_t chunk = (n + P - 1) / P;
    const uint32_t j0 = p * chunk, j1 = min(n, j0 + chunk);
    const uint32_t* table = tables + (size_t)m * row_stride;

    float qv[MAX_REP][MAX_NPL], acc[MAX_REP][MAX_NPL], mx[MAX_REP], sum[MAX_REP];
    const T* qrow = q + ((size_t)rows[m] * H + (size_t)g * rep) * D;
#pragma unroll
    for (int r = 0; r < MAX_REP; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.f;
        Floats<MAX_NPL> qr = load_dims<T, MAX_NPL>(qrow + (r < rep ? r : 0) * D, d0, D);
#pragma unroll
        for (int i = 0; i < MAX_NPL; i++) {
            qv[r][i] = r < rep ? qr.v[i] * scale : 0.f;
            acc[r][i] = 0.f;
        }
    }
    for (uint32_t j = j0 + warp; j < j1; j += 2 * warps) {
        // Two keys per iteration, both loaded before either is used.
        const uint32_t jb = j + warps;
        const bool two = jb < j1;
        const size_t ra = (size_t)table[(j / bs) * block_stride] * bs + j % bs;
        const size_t rb = two ? (size_t)table[(jb / bs) * block_stride] * bs + jb % bs : ra;
        const Floats<MAX_NPL> ka = load_dims<T, MAX_NPL>(kc + (ra * KVH + g) * D, d0, D);
        const Floats<MAX_NPL> va = load_dims<T, MAX_NPL>(vc + (ra * KVH + g) * D, d0, D);
        const Floats<MAX_NPL> kb = load_dims<T, MAX_NPL>(kc + (rb * KVH + g) * D, d0, D);
        const Floats<MAX_NPL> vb = load_dims<T, MAX_NPL>(vc + (rb * KVH + g) * D, d0, D);
#pragma unroll
        for (int r = 0; r < MAX_REP; r++) {
            if (r >= rep) break;
            float sa = 0.f, sb = 0.f;
#pragma unroll
            for (int i = 0; i < MAX_NPL; i++) {
                sa += qv[r][i] * ka.v[i];
                sb += qv[r][i] * kb.v[i];
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                sa += __shfl_xor_sync(0xffffffff, sa, o);
                sb += __shfl_xor_sync(0xffffffff, sb, o);
            }
            if (!two) sb = -INFINITY;
            float m_new = fmaxf(mx[r], fmaxf(sa, sb));
            float c = __expf(mx[r] - m_new);
            float pa = __expf(sa - m_new), pb = two ? __expf(sb - m_new) : 0.f;
            sum[r] = sum[r] * c + pa + pb;
#pragma unroll
            for (int i = 0; i < MAX_NPL; i++) acc[r][i] = acc[r][i] * c + pa * va.v[i] + pb * vb.v[i];
            mx[r] = m_new;
        }
    }
    // Merge the warps' partial softmax states.
    extern __shared__ float smem[];  // [warps][rep][D + 2]
    const uint32_t stride = D + 2;
#pragma unroll
    for (int r = 0; r < MAX_REP; r++) {  // unrolled: acc[r] must not be indexed at run time
        if (r >= rep) break;
        float* s = smem + ((size_t)warp * rep + r) * stride;
#pragma unroll
        for (int i = 0; i < MAX_NPL; i++) {
            if (d0 + i < D) s[d0 + i] = acc[r][i];
        }
        if (lane == 0) {
            s[D] = mx[r];
            s[D + 1] = sum[r];
        }
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < rep * (D + 2); e += blockDim.x) {
        uint32_t r = e / (D + 2), d = e % (D + 2);
        float M = -INFINITY;
        for (uint32_t w = 0; w < warps; w++) M = fmaxf(M, smem[((size_t)w * rep + r) * stride + D]);
        float L = 0.f, o = 0.f;
        for (uint32_t w = 0; w < warps; w++) {
            const float* s = smem + ((size_t)w * rep + r) * stride;
            float c = (s[D] == -INFINITY) ? 0.f : __expf(s[D] - M);
            L += s[D + 1] * c;
            if (d < D) o += s[d] * c;
        }
        const size_t head = (size_t)m * H + (size_t)g * rep + r;
        if (P == 1) {
            if (d < D) out[head * D + d] = from_f<T>(L > 0.f ? o / L : 0.f);
        } else {
            part[(head * P + p) * stride + d] = d < D ? o : (d == D ? M : L);
        }
    }
}

// Pseudocode of paged_decode_merge, per query head row hr and dim d, over the P slices:
//   M = max_p max_p;  L = sum_p sum_p * exp(max_p - M);  out[hr, d] = sum_p acc_p[d] * exp(max_p - M) / L
template <typename T>
__device__ void paged_decode_merge(T* __restrict__ out, const float* __restrict__ part, uint32_t P, uint32_t D) {
    pdl_trigger();  // a skinny GEMM may follow (pdl.cuh)
    const size_t hr = blockIdx.x;
    const uint32_t stride = D + 2;
    const float* base = part + hr * P * stride;
    float M = -INFINITY;
    for (uint32_t p = 0; p < P; p++) M = fmaxf(M, base[p * stride + D]);
    for (uint32_t d = threadIdx.x; d < D; d += blockDim.x) {
        float L = 0.f, o = 0.f;
        for (uint32_t p = 0; p < P; p++) {
            const float* s = base + p * stride;
            float c = (s[D] == -INFINITY) ? 0.f : __expf(s[D] - M);
            L += s[D + 1] * c;
            o += s[d] * c;
        }
        out[hr * D + d] = from_f<T>(L > 0.f ? o / L : 0.f);
    }
}

// Pseudocode of write_kv: for t in 0..N: cache[slots[t]] = src[t]   (rows of `width` elements),
// skipping rows whose slot is 0xffffffff (padding rows of a CUDA graph bucket).
template <typename T>
__device__ void write_kv(T* __restrict__ cache, const T* __restrict__ src, const uint32_t* __restrict__ slots,
                         uint32_t n, uint32_t width) {
    const size_t total = (size_t)n * width;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t t = e / width, c = e % width;
        const uint32_t slot = slots[t];
        if (slot != 0xffffffffu) cache[(size_t)slot * width + c] = src[e];
    }
}

#define DECODE(T, SUFFIX, NPL, REP)                                                                      \
    extern "C" __global__ void paged_decode_attention_##SUFFIX##_npl##NPL##_rep##REP(                    \
        T* out, float* part, const T* q, const T* kc, const T* vc, const uint32_t* rows,                 \
        const uint32_t* tables, const uint32_t* ctx, uint32_t row_stride, uint32_t block_stride, uint32_t bs, uint32_t H,       \
        uint32_t KVH, uint32_t D, float scale) {                                                         \
        paged_decode_attention<T, NPL, REP>(out, part, q, kc, vc, rows, tables, ctx, row_stride, block_stride, bs, H,  \
                                            KVH, D, scale);                                              \
    }

#define INSTANTIATE(T, SUFFIX)                                                                              \
    DECODE(T, SUFFIX, 1, 4)                                                                                 \
    DECODE(T, SUFFIX, 2, 4)                                                                                 \
    DECODE(T, SUFFIX, 4, 4)                                                                                 \
    DECODE(T, SUFFIX, 8, 4)                                                                                 \
    DECODE(T, SUFFIX, 1, 8)                                                                                 \
    DECODE(T, SUFFIX, 2, 8)                                                                                 \
    DECODE(T, SUFFIX, 4, 8)                                                                                 \
    DECODE(T, SUFFIX, 8, 8)                                                                                 \
    extern "C" __global__ void paged_decode_merge_##SUFFIX(T* out, const float* part, uint32_t P, uint32_t D) { \
        paged_decode_merge<T>(out, part, P, D);                                                             \
    }                                                                                                       \
    extern "C" __global__ void write_kv_##SUFFIX(T* cache, const T* src, const uint32_t* slots, uint32_t n, \
                                                 uint32_t width) {                                          \
        write_kv<T>(cache, src, slots, n, width);                                                           \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
