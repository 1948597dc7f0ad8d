// Batched multi-LoRA (BGMV): every row of the batch picks its own adapter slot, one launch for
// the shrink and one for the expand of up to three projections that share their input (q/k/v,
// gate/up), whatever the mix of adapters. Segment z = blockIdx.z picks the projection.
//
// Layouts (row-major, contiguous), per projection z:
//   x     [M, K]        the shared input rows
//   y_z   [M, N_z]      the base output x W_z^T, updated in place
//   a_z   [S, R, K]     A of every slot, padded to R = --max-lora-rank rows
//   bt_z  [S, R, N_z]   B^T of every slot, same padding
//   slot  [M] u32       the row's slot, NO_SLOT = base only
//   meta_z [2S] u32     rank of each slot for this projection (0 = the adapter does not touch
//                       it), then each slot's scale as f32 bits
//   t_z   [M, R] f32    scratch between the two kernels
//
// Pseudocode:
//   for m: s = slot[m]; if s == NO_SLOT or rank[s] == 0: skip the row (no read, no write)
//     shrink: t[m, j] = scale[s] * sum_k x[m, k] * a[s, j, k]          for j < rank[s]
//     expand: y[m, n] = round(y[m, n] + sum_{j < rank[s]} t[m, j] * bt[s, j, n])
//
// A slot of rank r < R costs rank r (rows past r are never read), so mixed ranks do not pay the
// largest; base rows cost nothing but the launch. Sums are f32 in a fixed order that depends on
// the row alone, so a row's output does not depend on its neighbours or the batch size. Both
// kernels read their slots and ranks on the device, so one CUDA graph serves every adapter mix.
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

#define SHRINK_UNROLL 4
#define EXPAND_UNROLL 8
// Blocks per (row, projection) of the shrink: its warps split the rank rows j among them.
#define SHRINK_GROUPS 4

// Block (g, m, z), one warp per rank row: warp w handles j = (g * WARPS + w) + i * (G * WARPS)
// below the slot's rank, its 32 lanes split the K dot product (8 elements per load,
// SHRINK_UNROLL loads in flight) and reduce by a fixed butterfly. A row costs G = SHRINK_GROUPS
// blocks whatever --max-lora-rank is (one block per rank row and row made 196k mostly idle
// blocks per launch for a 1024-row prefill at R = 64). K % 8 == 0.
template <typename T>
__device__ void shrink(float* t0, float* t1, float* t2, const T* __restrict__ x, const T* a0, const T* a1,
                       const T* a2, const uint32_t* __restrict__ slot, const uint32_t* m0, const uint32_t* m1,
                       const uint32_t* m2, uint32_t S, uint32_t K, uint32_t R) {
    const uint32_t m = blockIdx.y, z = blockIdx.z;
    const uint32_t warps = THREADS / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t* meta = pick(z, m0, m1, m2);
    const uint32_t s = slot[m];
    if (s == NO_SLOT || s >= S) return;
    const uint32_t rank = min(meta[s], R);
    const float scale = __uint_as_float(meta[S + s]);
    const T* xr = x + (size_t)m * K;
    const T* a = pick(z, a0, a1, a2) + (size_t)s * R * K;
    float* t = pick(z, t0, t1, t2) + (size_t)m * R;
    const uint32_t runs = K / 8;
    for (uint32_t j = blockIdx.x * warps + warp; j < rank; j += gridDim.x * warps) {
        const T* ar = a + (size_t)j * K;
        float acc = 0.f;
        for (uint32_t r0 = lane; r0 < runs; r0 += 32 * SHRINK_UNROLL) {
            float xf[SHRINK_UNROLL][8], af[SHRINK_UNROLL][8];
#pragma unroll
            for (int u = 0; u < SHRINK_UNROLL; u++) {
                const uint32_t r = r0 + u * 32;
                if (r < runs) {
                    load8(xr + 8 * r, xf[u]);
                    load8(ar + 8 * r, af[u]);
                }
            }
#pragma unroll
            for (int u = 0; u < SHRINK_UNROLL; u++) {
                if (r0 + u * 32 < runs) {
#pragma unroll
                    for (int e = 0; e < 8; e++) acc = fmaf(xf[u][e], af[u][e], acc);
                }
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
        if (lane == 0) t[j] = scale * acc;
    }
}

// Block (n-tile, m, z): each thread owns 8 consecutive output columns, EXPAND_UNROLL ranks'
// rows of B^T in flight. N_z % 8 == 0.
template <typename T>
__device__ void expand(T* y0, T* y1, T* y2, const float* t0, const float* t1, const float* t2, const T* b0,
                       const T* b1, const T* b2, const uint32_t* __restrict__ slot, const uint32_t* m0,
                       const uint32_t* m1, const uint32_t* m2, uint32_t S, uint32_t N0, uint32_t N1, uint32_t N2,
                       uint32_t R) {
    const uint32_t m = blockIdx.y, z = blockIdx.z;
    const uint32_t N = pick(z, N0, N1, N2);
    const uint32_t* meta = pick(z, m0, m1, m2);
    const uint32_t s = slot[m];
    if (s == NO_SLOT || s >= S) return;
    const uint32_t r = meta[s];
    const uint32_t n = (blockIdx.x * THREADS + threadIdx.x) * 8;
    if (r == 0 || blockIdx.x * THREADS * 8 >= N) return;
    __shared__ float tr[256];
    const float* t = pick(z, t0, t1, t2);
    for (uint32_t j = threadIdx.x; j < r && j < 256; j += THREADS) tr[j] = t[(size_t)m * R + j];
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
    T* yr = pick(z, y0, y1, y2) + (size_t)m * N + n;
#pragma unroll
    for (int e = 0; e < 8; e++) yr[e] = from_f<T>(to_f(yr[e]) + acc[e]);
}

#define LORA(T, SUFFIX)                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS) lora_shrink_##SUFFIX(                              \
        float* t0, float* t1, float* t2, const T* x, const T* a0, const T* a1, const T* a2, const uint32_t* slot, \
        const uint32_t* m0, const uint32_t* m1, const uint32_t* m2, uint32_t S, uint32_t K, uint32_t R) {    \
        shrink<T>(t0, t1, t2, x, a0, a1, a2, slot, m0, m1, m2, S, K, R);                                     \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) lora_expand_##SUFFIX(                              \
        T* y0, T* y1, T* y2, const float* t0, const float* t1, const float* t2, const T* b0, const T* b1,    \
        const T* b2, const uint32_t* slot, const uint32_t* m0, const uint32_t* m1, const uint32_t* m2,       \
        uint32_t S, uint32_t N0, uint32_t N1, uint32_t N2, uint32_t R) {                                     \
        expand<T>(y0, y1, y2, t0, t1, t2, b0, b1, b2, slot, m0, m1, m2, S, N0, N1, N2, R);                   \
    }

LORA(float, f32)
LORA(__nv_bfloat16, bf16)
LORA(__half, f16)
