// Paged attention for decode rows, and the KV-cache write, in place on the block pool.
//
// Layouts (all row-major, contiguous):
//   q          [M_total, H, D]          query rows of the packed batch (after RoPE)
//   k/v cache  [num_blocks * bs, KVH, D] one layer's pool; row = block * bs + pos % bs
//   rows       [M]                       which q row each processed query is (decode rows)
//   tables     [M, max_blocks]           block ids of that query's sequence
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
// One thread block per (m, g) handles the `rep` query heads of kv head g, so each key and value
// row is read once for all of them (GQA). Warps stride over keys; lanes stride over head dims
// (lane + 32 i), so a warp reads a key row as coalesced 64-byte runs. Each warp keeps an online
// softmax (max, sum, weighted V) per head; the warps' partial states are merged at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARPS 4
#define MAX_REP 8  // query heads per kv head
// MAX_NPL (head dims per lane, ceil(D / 32)) is a template parameter: registers scale with it.

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

template <typename T, int MAX_NPL>
__device__ void paged_decode_attention(
    T* __restrict__ out, const T* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
    const uint32_t* __restrict__ rows, const uint32_t* __restrict__ tables, const uint32_t* __restrict__ ctx,
    uint32_t max_blocks, uint32_t bs, uint32_t H, uint32_t KVH, uint32_t D, float scale) {
    const uint32_t m = blockIdx.x, g = blockIdx.y;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t rep = H / KVH;
    const uint32_t npl = (D + 31) / 32;
    const uint32_t n = ctx[m];
    const uint32_t* table = tables + (size_t)m * max_blocks;

    float qv[MAX_REP][MAX_NPL], acc[MAX_REP][MAX_NPL], mx[MAX_REP], sum[MAX_REP];
    const T* qrow = q + ((size_t)rows[m] * H + (size_t)g * rep) * D;
#pragma unroll
    for (int r = 0; r < MAX_REP; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.f;
#pragma unroll
        for (int i = 0; i < MAX_NPL; i++) {
            uint32_t d = lane + 32 * i;
            qv[r][i] = (r < rep && i < npl && d < D) ? to_f(qrow[r * D + d]) * scale : 0.f;
            acc[r][i] = 0.f;
        }
    }
    for (uint32_t j = warp; j < n; j += WARPS) {
        const size_t row = (size_t)table[j / bs] * bs + j % bs;
        const T* krow = kc + (row * KVH + g) * D;
        const T* vrow = vc + (row * KVH + g) * D;
        float kv[MAX_NPL], vv[MAX_NPL];
#pragma unroll
        for (int i = 0; i < MAX_NPL; i++) {
            uint32_t d = lane + 32 * i;
            bool in = i < npl && d < D;
            kv[i] = in ? to_f(krow[d]) : 0.f;
            vv[i] = in ? to_f(vrow[d]) : 0.f;
        }
#pragma unroll
        for (int r = 0; r < MAX_REP; r++) {
            if (r >= rep) break;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < MAX_NPL; i++) s += qv[r][i] * kv[i];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
            float m_new = fmaxf(mx[r], s);
            float c = __expf(mx[r] - m_new);
            float p = __expf(s - m_new);
            sum[r] = sum[r] * c + p;
#pragma unroll
            for (int i = 0; i < MAX_NPL; i++) acc[r][i] = acc[r][i] * c + p * vv[i];
            mx[r] = m_new;
        }
    }
    // Merge the warps' partial softmax states.
    extern __shared__ float smem[];  // [WARPS][rep][D + 2]
    const uint32_t stride = D + 2;
    for (uint32_t r = 0; r < rep; r++) {
        float* s = smem + ((size_t)warp * rep + r) * stride;
#pragma unroll
        for (int i = 0; i < MAX_NPL; i++) {
            uint32_t d = lane + 32 * i;
            if (i < npl && d < D) s[d] = acc[r][i];
        }
        if (lane == 0) {
            s[D] = mx[r];
            s[D + 1] = sum[r];
        }
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < rep * D; e += blockDim.x) {
        uint32_t r = e / D, d = e % D;
        float M = -INFINITY;
        for (int w = 0; w < WARPS; w++) M = fmaxf(M, smem[((size_t)w * rep + r) * stride + D]);
        float L = 0.f, o = 0.f;
        for (int w = 0; w < WARPS; w++) {
            const float* s = smem + ((size_t)w * rep + r) * stride;
            float c = (s[D] == -INFINITY) ? 0.f : __expf(s[D] - M);
            L += s[D + 1] * c;
            o += s[d] * c;
        }
        out[((size_t)m * H + (size_t)g * rep + r) * D + d] = from_f<T>(L > 0.f ? o / L : 0.f);
    }
}

// Pseudocode of write_kv: for t in 0..N: cache[slots[t]] = src[t]   (rows of `width` elements)
template <typename T>
__device__ void write_kv(T* __restrict__ cache, const T* __restrict__ src, const uint32_t* __restrict__ slots,
                         uint32_t n, uint32_t width) {
    const size_t total = (size_t)n * width;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        size_t t = e / width, c = e % width;
        cache[(size_t)slots[t] * width + c] = src[e];
    }
}

#define DECODE(T, SUFFIX, NPL)                                                                           \
    extern "C" __global__ void paged_decode_attention_##SUFFIX##_npl##NPL(                               \
        T* out, const T* q, const T* kc, const T* vc, const uint32_t* rows, const uint32_t* tables,      \
        const uint32_t* ctx, uint32_t max_blocks, uint32_t bs, uint32_t H, uint32_t KVH, uint32_t D,     \
        float scale) {                                                                                   \
        paged_decode_attention<T, NPL>(out, q, kc, vc, rows, tables, ctx, max_blocks, bs, H, KVH, D,     \
                                       scale);                                                           \
    }

#define INSTANTIATE(T, SUFFIX)                                                                              \
    DECODE(T, SUFFIX, 1)                                                                                    \
    DECODE(T, SUFFIX, 2)                                                                                    \
    DECODE(T, SUFFIX, 4)                                                                                    \
    DECODE(T, SUFFIX, 8)                                                                                    \
    extern "C" __global__ void write_kv_##SUFFIX(T* cache, const T* src, const uint32_t* slots, uint32_t n, \
                                                 uint32_t width) {                                          \
        write_kv<T>(cache, src, slots, n, width);                                                           \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
