// Paged decode attention, grouped-lanes variant: the same function as paged_decode_attention
// (paged_attention.cu, whose layouts and `part` format it shares, so paged_decode_merge folds
// its slices), with more key rows in flight per warp.
//
// paged_decode_attention gives each key row a whole warp (lanes over head dims) and keeps two
// rows in flight, so at batch 32 and up it waits on memory latency. Here a key row takes a
// group of G lanes, each lane one 16-byte run (EPL = 16 / sizeof(T) elements, D = G * EPL), so
// a warp holds 32 / G rows per pass and UNROLL passes are loaded before any is used:
//
//   block (m, g, p), warp w, lane = group gi * G + li:
//     for each pass t (keys j = j0 + ((t * UNROLL + u) * WARPS + w) * KPW + gi, u < UNROLL):
//       load k[j][li*EPL .. +EPL], v[j][...]            (UNROLL x 2 loads of 16 bytes in flight)
//       s = scale * dot(q[h], k[j])  summed over the G lanes of the group (xor shuffles < G)
//       online softmax state (max, sum, acc[EPL]) per group and query head
//   merge the 32 / G groups of the warp (xor shuffles >= G), then the warps through shared
//   memory, then write out (P == 1) or this slice's (acc, max, sum) to part (P > 1).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "pdl.cuh"

#define WARPS 4
#define UNROLL 4


// The EPL elements of one 16-byte run as floats.
template <typename T>
__device__ __forceinline__ void unpack(const uint4& u, float* f) {
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < (int)(16 / sizeof(T)); i++) f[i] = to_f(e[i]);
}

// Folds state (m2, l2, a2) into (m, l, a); -inf maxima (nothing seen) weigh 0.
template <int EPL>
__device__ __forceinline__ void fold(float& m, float& l, float* a, float m2, float l2, const float* a2) {
    const float M = fmaxf(m, m2);
    const float c1 = (m == -INFINITY) ? 0.f : __expf(m - M);
    const float c2 = (m2 == -INFINITY) ? 0.f : __expf(m2 - M);
    l = l * c1 + l2 * c2;
#pragma unroll
    for (int i = 0; i < EPL; i++) a[i] = a[i] * c1 + a2[i] * c2;
    m = M;
}

template <typename T, int G, int MAX_REP>
__device__ void paged_decode_grouped(T* __restrict__ out, float* __restrict__ part, const T* __restrict__ q,
                                     const T* __restrict__ kc, const T* __restrict__ vc,
                                     const uint32_t* __restrict__ rows, const uint32_t* __restrict__ tables,
                                     const uint32_t* __restrict__ ctx, uint32_t row_stride, uint32_t block_stride,
                                     uint32_t bs, uint32_t H, uint32_t KVH, float scale) {
    pdl_trigger();  // a skinny GEMM may follow (pdl.cuh)
    constexpr int EPL = 16 / sizeof(T);
    constexpr int KPW = 32 / G;
    constexpr uint32_t D = G * EPL;
    const uint32_t m = blockIdx.x, g = blockIdx.y, p = blockIdx.z, P = gridDim.z;
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t gi = lane / G, li = lane % G;
    const uint32_t rep = H / KVH;
    const uint32_t n = ctx[m];
    const uint32_t chunk = (n + P - 1) / P;
    const uint32_t j0 = p * chunk, j1 = min(n, j0 + chunk);
    const uint32_t* table = tables + (size_t)m * row_stride;

    float qv[MAX_REP][EPL], acc[MAX_REP][EPL], mx[MAX_REP], sum[MAX_REP];
    const T* qrow = q + ((size_t)rows[m] * H + (size_t)g * rep) * D + li * EPL;
#pragma unroll
    for (int r = 0; r < MAX_REP; r++) {
        mx[r] = -INFINITY;
        sum[r] = 0.f;
        float f[EPL];
        unpack<T>(*reinterpret_cast<const uint4*>(qrow + (size_t)(r < rep ? r : 0) * D), f);
#pragma unroll
        for (int i = 0; i < EPL; i++) {
            qv[r][i] = r < rep ? f[i] * scale : 0.f;
            acc[r][i] = 0.f;
        }
    }
    const uint32_t per_pass = UNROLL * WARPS * KPW;
    for (uint32_t base = j0; base < j1; base += per_pass) {
        uint4 kr[UNROLL], vr[UNROLL];
        bool ok[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const uint32_t j = base + (u * WARPS + warp) * KPW + gi;
            ok[u] = j < j1;
            if (ok[u]) {
                const size_t row = (size_t)table[(j / bs) * block_stride] * bs + j % bs;
                const size_t off = (row * KVH + g) * D + li * EPL;
                kr[u] = *reinterpret_cast<const uint4*>(kc + off);
                vr[u] = *reinterpret_cast<const uint4*>(vc + off);
            } else {
                kr[u] = make_uint4(0, 0, 0, 0);
                vr[u] = make_uint4(0, 0, 0, 0);
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            float kf[EPL], vf[EPL];
            unpack<T>(kr[u], kf);
            unpack<T>(vr[u], vf);
#pragma unroll
            for (int r = 0; r < MAX_REP; r++) {
                if (r >= rep) break;
                float s = 0.f;
#pragma unroll
                for (int i = 0; i < EPL; i++) s += qv[r][i] * kf[i];
#pragma unroll
                for (int o = G / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
                if (ok[u]) {  // uniform within a group: all its lanes share j
                    const float m_new = fmaxf(mx[r], s);
                    const float c = __expf(mx[r] - m_new);  // mx = -inf: c = 0, acc and sum are 0
                    const float pj = __expf(s - m_new);
                    sum[r] = sum[r] * c + pj;
#pragma unroll
                    for (int i = 0; i < EPL; i++) acc[r][i] = acc[r][i] * c + pj * vf[i];
                    mx[r] = m_new;
                }
            }
        }
    }
    // Merge the warp's groups: lanes li of every group hold the same dims.
#pragma unroll
    for (int r = 0; r < MAX_REP; r++) {
        if (r >= rep) break;
#pragma unroll
        for (int o = G; o < 32; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffff, mx[r], o);
            const float l2 = __shfl_xor_sync(0xffffffff, sum[r], o);
            float a2[EPL];
#pragma unroll
            for (int i = 0; i < EPL; i++) a2[i] = __shfl_xor_sync(0xffffffff, acc[r][i], o);
            fold<EPL>(mx[r], sum[r], acc[r], m2, l2, a2);
        }
    }
    extern __shared__ float smem[];  // [WARPS][rep][D + 2]
    const uint32_t stride = D + 2;
    if (gi == 0) {
#pragma unroll
        for (int r = 0; r < MAX_REP; r++) {
            if (r >= rep) break;
            float* s = smem + ((size_t)warp * rep + r) * stride;
#pragma unroll
            for (int i = 0; i < EPL; i++) s[li * EPL + i] = acc[r][i];
            if (li == 0) {
                s[D] = mx[r];
                s[D + 1] = sum[r];
            }
        }
    }
    __syncthreads();
    for (uint32_t e = threadIdx.x; e < rep * (D + 2); e += blockDim.x) {
        const uint32_t r = e / (D + 2), d = e % (D + 2);
        float M = -INFINITY;
        for (uint32_t w = 0; w < WARPS; w++) M = fmaxf(M, smem[((size_t)w * rep + r) * stride + D]);
        float L = 0.f, o = 0.f;
        for (uint32_t w = 0; w < WARPS; w++) {
            const float* s = smem + ((size_t)w * rep + r) * stride;
            const float c = (s[D] == -INFINITY) ? 0.f : __expf(s[D] - M);
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

#define GROUPED(T, SUFFIX, G, REP)                                                                     \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) paged_decode_grouped_##SUFFIX##_g##G##_rep##REP( \
        T* out, float* part, const T* q, const T* kc, const T* vc, const uint32_t* rows,                 \
        const uint32_t* tables, const uint32_t* ctx, uint32_t row_stride, uint32_t block_stride, uint32_t bs, \
        uint32_t H, uint32_t KVH, float scale) {                                                         \
        paged_decode_grouped<T, G, REP>(out, part, q, kc, vc, rows, tables, ctx, row_stride, block_stride, bs, H, \
                                        KVH, scale);                                                     \
    }

#define INSTANTIATE(T, SUFFIX) \
    GROUPED(T, SUFFIX, 2, 4)   \
    GROUPED(T, SUFFIX, 4, 4)   \
    GROUPED(T, SUFFIX, 8, 4)   \
    GROUPED(T, SUFFIX, 16, 4)  \
    GROUPED(T, SUFFIX, 32, 4)  \
    GROUPED(T, SUFFIX, 2, 8)   \
    GROUPED(T, SUFFIX, 4, 8)   \
    GROUPED(T, SUFFIX, 8, 8)   \
    GROUPED(T, SUFFIX, 16, 8)  \
    GROUPED(T, SUFFIX, 32, 8)

INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
