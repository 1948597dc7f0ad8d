// Batched multi-LoRA (BGMV): every row of the batch picks its own adapter slot, one launch for
// the shrink and one for the expand of up to three projections that share their input (q/k/v,
// gate/up), whatever the mix of adapters. Segment z = blockIdx.z picks the projection.
//
// Layouts (row-major), per projection z:
//   x     [M, K]        the shared input rows (contiguous)
//   y     [M, ld]       the base outputs; projection z owns columns col_z .. col_z + N_z (a
//                       fused q|k|v or gate|up product, or one projection alone), updated in place
//   a_z   [S, R, K]     A of every slot, padded to R = --max-lora-rank rows
//   bt_z  [S, R, N_z]   B^T of every slot, same padding
//   slot  [M] u32       the row's slot, NO_SLOT = base only
//   meta_z [2S] u32     rank of each slot for this projection (0 = the adapter does not touch
//                       it), then each slot's scale as f32 bits
//   tp    [Z, M, KS, R] f32 partial dot products between the two kernels, KS = ceil(K / CHUNK)
//
// Pseudocode:
//   for m: s = slot[m]; if s == NO_SLOT or rank[s] == 0: skip the row (no read, no write)
//     shrink: tp[z, m, c, j] = sum_{k in chunk c} x[m, k] * a[s, j, k]       for j < rank[s]
//     expand: t[j] = scale[s] * sum_c tp[z, m, c, j]
//             y[m, col_z + n] = round(y[m, col_z + n] + sum_{j < rank[s]} t[j] * bt[s, j, n])
//
// The shrink splits K into chunks of CHUNK so each warp's loads of a rank row are all in flight
// at once: a decode step has few rows, and a warp walking the whole K (14336 for down_proj) was
// a chain of dependent memory round trips, which made the LoRA launches cost far more than
// their bytes. A slot of rank r < R costs rank r (rows past r are never read), so mixed ranks
// do not pay the largest; base rows cost nothing but the launch. Sums are f32 in a fixed order
// that depends on the row alone, so a row's output does not depend on its neighbours or the
// batch size. Both kernels read their slots and ranks on the device, so one CUDA graph serves
// every adapter mix.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"

#define NO_SLOT 0xffffffffu
#define THREADS 128

__device__ __forceinline__ void load8(const float* p, float* f) {
    const float4* q = reinterpret_cast<const float4*>(p);
    float4 a = q[0], b = q[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void load8(const __half* p, float* f) {
    uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __half22float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

// Up to three projections' pointers, by segment.
template <typename P>
__device__ __forceinline__ P pick(uint32_t z, P p0, P p1, P p2) {
    return z == 0 ? p0 : (z == 1 ? p1 : p2);
}

// Elements of K one shrink block covers: 32 lanes x 8 elements x SHRINK_UNROLL loads.
#define SHRINK_UNROLL 4
#define CHUNK (32 * 8 * SHRINK_UNROLL)
#define SHRINK_THREADS 512
#define EXPAND_UNROLL 8

// Block (c, m, z): warp w handles the rank rows j = w, w + 16, ... below the slot's rank over
// chunk c of K; its lanes load 8 elements per run, all SHRINK_UNROLL runs in flight, and reduce
// by a fixed butterfly. K % 8 == 0.
template <typename T>
__device__ void shrink(float* __restrict__ tp, const T* __restrict__ x, const T* a0, const T* a1, const T* a2,
                       const uint32_t* __restrict__ slot, const uint32_t* m0, const uint32_t* m1, const uint32_t* m2,
                       uint32_t S, uint32_t K, uint32_t R) {
    const uint32_t c = blockIdx.x, m = blockIdx.y, z = blockIdx.z, M = gridDim.y, KS = gridDim.x;
    const uint32_t warps = SHRINK_THREADS / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t* meta = pick(z, m0, m1, m2);
    const uint32_t s = slot[m];
    if (s == NO_SLOT || s >= S) return;
    const uint32_t rank = min(meta[s], R);
    const uint32_t runs = K / 8, r_begin = c * (CHUNK / 8), r_end = min(runs, r_begin + CHUNK / 8);
    const T* xr = x + (size_t)m * K;
    const T* a = pick(z, a0, a1, a2) + (size_t)s * R * K;
    float* t = tp + ((size_t)(z * M + m) * KS + c) * R;
    for (uint32_t j = warp; j < rank; j += warps) {
        const T* ar = a + (size_t)j * K;
        float xf[SHRINK_UNROLL][8], af[SHRINK_UNROLL][8];
#pragma unroll
        for (int u = 0; u < SHRINK_UNROLL; u++) {
            const uint32_t r = r_begin + lane + u * 32;
            if (r < r_end) {
                load8(xr + 8 * r, xf[u]);
                load8(ar + 8 * r, af[u]);
            }
        }
        float acc = 0.f;
#pragma unroll
        for (int u = 0; u < SHRINK_UNROLL; u++) {
            if (r_begin + lane + u * 32 < r_end) {
#pragma unroll
                for (int e = 0; e < 8; e++) acc = fmaf(xf[u][e], af[u][e], acc);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
        if (lane == 0) t[j] = acc;
    }
}

// Block (n-tile, m, z): each thread owns 8 consecutive output columns, EXPAND_UNROLL ranks'
// rows of B^T in flight. N_z % 8 == 0. DELTA: write the update alone as f32 into `out`
// (zeros for rows without an adapter), for a consumer that adds it (the fused layer runs the
// LoRA kernels on a side stream, concurrent with the base GEMM); else add it to y in place.
template <typename T, bool DELTA>
__device__ void expand(T* y, float* out, uint32_t ld, uint32_t c0, uint32_t c1, uint32_t c2,
                       const float* __restrict__ tp, const T* b0, const T* b1, const T* b2,
                       const uint32_t* __restrict__ slot, const uint32_t* m0, const uint32_t* m1, const uint32_t* m2,
                       uint32_t S, uint32_t N0, uint32_t N1, uint32_t N2, uint32_t R, uint32_t KS) {
    const uint32_t m = blockIdx.y, z = blockIdx.z, M = gridDim.y;
    const uint32_t N = pick(z, N0, N1, N2);
    const uint32_t* meta = pick(z, m0, m1, m2);
    const uint32_t n = (blockIdx.x * THREADS + threadIdx.x) * 8;
    if (blockIdx.x * THREADS * 8 >= N) return;
    const uint32_t s = slot[m];
    const uint32_t r = (s == NO_SLOT || s >= S) ? 0 : min(meta[s], R);
    if (r == 0) {
        if (DELTA && n < N) {
            float* o = out + (size_t)m * ld + pick(z, c0, c1, c2) + n;
#pragma unroll
            for (int e = 0; e < 8; e++) o[e] = 0.f;
        }
        return;
    }
    const float scale = __uint_as_float(meta[S + s]);
    __shared__ float tr[256];
    const float* t = tp + (size_t)(z * M + m) * KS * R;
    for (uint32_t j = threadIdx.x; j < r && j < 256; j += THREADS) {
        float sum = 0.f;
        for (uint32_t c = 0; c < KS; c++) sum += t[(size_t)c * R + j];
        tr[j] = scale * sum;
    }
    __syncthreads();
    if (n >= N) return;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const T* b = pick(z, b0, b1, b2) + (size_t)s * R * N + n;
    for (uint32_t j0 = 0; j0 < r; j0 += EXPAND_UNROLL) {
        float bf[EXPAND_UNROLL][8];
#pragma unroll
        for (int u = 0; u < EXPAND_UNROLL; u++)
            if (j0 + u < r) load8(b + (size_t)(j0 + u) * N, bf[u]);
#pragma unroll
        for (int u = 0; u < EXPAND_UNROLL; u++) {
            if (j0 + u < r) {
                const float tj = tr[j0 + u];
#pragma unroll
                for (int e = 0; e < 8; e++) acc[e] = fmaf(tj, bf[u][e], acc[e]);
            }
        }
    }
    const size_t at = (size_t)m * ld + pick(z, c0, c1, c2) + n;
    if (DELTA) {
#pragma unroll
        for (int e = 0; e < 8; e++) out[at + e] = acc[e];
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) y[at + e] = from_f<T>(to_f(y[at + e]) + acc[e]);
    }
}

#define LORA(T, SUFFIX)                                                                                      \
    extern "C" __global__ void __launch_bounds__(SHRINK_THREADS) lora_shrink_##SUFFIX(                       \
        float* tp, const T* x, const T* a0, const T* a1, const T* a2, const uint32_t* slot, const uint32_t* m0, \
        const uint32_t* m1, const uint32_t* m2, uint32_t S, uint32_t K, uint32_t R) {                        \
        shrink<T>(tp, x, a0, a1, a2, slot, m0, m1, m2, S, K, R);                                             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) lora_expand_##SUFFIX(                              \
        T* y, uint32_t ld, uint32_t c0, uint32_t c1, uint32_t c2, const float* tp, const T* b0, const T* b1, \
        const T* b2, const uint32_t* slot, const uint32_t* m0, const uint32_t* m1, const uint32_t* m2,       \
        uint32_t S, uint32_t N0, uint32_t N1, uint32_t N2, uint32_t R, uint32_t KS) {                        \
        expand<T, false>(y, nullptr, ld, c0, c1, c2, tp, b0, b1, b2, slot, m0, m1, m2, S, N0, N1, N2, R, KS); \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) lora_delta_##SUFFIX(                               \
        float* out, uint32_t ld, uint32_t c0, uint32_t c1, uint32_t c2, const float* tp, const T* b0,        \
        const T* b1, const T* b2, const uint32_t* slot, const uint32_t* m0, const uint32_t* m1,              \
        const uint32_t* m2, uint32_t S, uint32_t N0, uint32_t N1, uint32_t N2, uint32_t R, uint32_t KS) {    \
        expand<T, true>(nullptr, out, ld, c0, c1, c2, tp, b0, b1, b2, slot, m0, m1, m2, S, N0, N1, N2, R, KS); \
    }

LORA(float, f32)
LORA(__nv_bfloat16, bf16)
LORA(__half, f16)
