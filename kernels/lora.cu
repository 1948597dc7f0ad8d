// Batched multi-LoRA for one projection (BGMV): every row of the batch picks its own adapter
// slot, one launch for the shrink and one for the expand, whatever the mix of adapters.
//
// Layouts (row-major, contiguous):
//   x    [M, K]        the projection's input rows
//   y    [M, N]        the base output x W^T, updated in place
//   a    [S, R, K]     A of every slot, padded to R = --max-lora-rank rows
//   bt   [S, R, N]     B^T of every slot, same padding
//   slot [M] u32       the row's slot, NO_SLOT = base only
//   meta [2S] u32      rank of each slot for this projection (0 = the adapter does not touch it),
//                      then each slot's scale as f32 bits
//   t    [M, R] f32    scratch between the two kernels
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

// One block per (j, m): THREADS threads split the K dot product (8 elements per step each) and
// reduce through shared memory in a fixed order. K % 8 == 0.
template <typename T>
__device__ void shrink(float* __restrict__ t, const T* __restrict__ x, const T* __restrict__ a,
                       const uint32_t* __restrict__ slot, const uint32_t* __restrict__ meta, uint32_t S,
                       uint32_t K, uint32_t R) {
    const uint32_t j = blockIdx.x, m = blockIdx.y;
    const uint32_t s = slot[m];
    if (s == NO_SLOT || s >= S || j >= meta[s]) return;
    const float scale = __uint_as_float(meta[S + s]);
    const T* xr = x + (size_t)m * K;
    const T* ar = a + ((size_t)s * R + j) * K;
    float acc = 0.f;
    for (uint32_t k = threadIdx.x * 8; k < K; k += THREADS * 8) {
        float xf[8], af[8];
        load8(xr + k, xf);
        load8(ar + k, af);
#pragma unroll
        for (int e = 0; e < 8; e++) acc = fmaf(xf[e], af[e], acc);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
    __shared__ float part[THREADS / 32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < THREADS / 32; w++) v += part[w];
        t[(size_t)m * R + j] = scale * v;
    }
}

// Block (n-tile, m): each thread owns 8 consecutive output columns. N % 8 == 0.
template <typename T>
__device__ void expand(T* __restrict__ y, const float* __restrict__ t, const T* __restrict__ bt,
                       const uint32_t* __restrict__ slot, const uint32_t* __restrict__ meta, uint32_t S,
                       uint32_t N, uint32_t R) {
    const uint32_t m = blockIdx.y;
    const uint32_t s = slot[m];
    if (s == NO_SLOT || s >= S) return;
    const uint32_t r = meta[s];
    if (r == 0) return;
    __shared__ float tr[256];
    for (uint32_t j = threadIdx.x; j < r && j < 256; j += THREADS) tr[j] = t[(size_t)m * R + j];
    __syncthreads();
    const uint32_t n = (blockIdx.x * THREADS + threadIdx.x) * 8;
    if (n >= N) return;
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    const T* b = bt + (size_t)s * R * N + n;
    for (uint32_t j = 0; j < r; j++) {
        float bf[8];
        load8(b + (size_t)j * N, bf);
        const float tj = tr[j];
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = fmaf(tj, bf[e], acc[e]);
    }
    T* yr = y + (size_t)m * N + n;
#pragma unroll
    for (int e = 0; e < 8; e++) yr[e] = from_f<T>(to_f(yr[e]) + acc[e]);
}

#define LORA(T, SUFFIX)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                  \
        lora_shrink_##SUFFIX(float* t, const T* x, const T* a, const uint32_t* slot, const uint32_t* meta, \
                             uint32_t S, uint32_t K, uint32_t R) {                                         \
        shrink<T>(t, x, a, slot, meta, S, K, R);                                                           \
    }                                                                                                      \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                  \
        lora_expand_##SUFFIX(T* y, const float* t, const T* bt, const uint32_t* slot, const uint32_t* meta, \
                             uint32_t S, uint32_t N, uint32_t R) {                                         \
        expand<T>(y, t, bt, slot, meta, S, N, R);                                                          \
    }

LORA(float, f32)
LORA(__nv_bfloat16, bf16)
LORA(__half, f16)
