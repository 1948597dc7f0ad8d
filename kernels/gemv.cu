// Skinny GEMM for decode: y = x W^T with few rows of x (M <= 8), W in the Hugging Face layout.
//
// Layouts (row-major, contiguous, 16-byte aligned rows):
//   x [M, K]    activations (M = decode rows of the step)
//   w [N, K]    weight (out_features x in_features)
//   y [M, N]
//
// Pseudocode, per output column n and row m:
//   y[m, n] = sum_k x[m, k] * w[n, k]        (f32 accumulation, one rounding to T at the end)
//
// A decode step reads every weight once and does almost no arithmetic per byte, so what counts
// is keeping enough bytes in flight: each warp owns NPW consecutive output columns over the
// whole K; lane l reads 16-byte runs (8 elements) at k = 8 l + 256 i, UNROLL runs per column at
// once, and reuses each x run for its NPW columns (x comes from L1; with NPW columns per load,
// L1 traffic stays at M / NPW times the DRAM traffic). The lane sums go through a fixed
// butterfly, so y[m, n] is summed in the same order whatever M is: a row's result does not
// depend on how many rows share the step (cuBLAS picks other kernels, and roundings, per M).
// With an early start (pdl.cuh, opt-in: it measured no faster on the H200) the kernel may be
// scheduled before the one that writes x has finished; it waits for it before any load. (A
// version that requested its first weights before waiting, double-buffering the rest, took the
// one-row decode graph step from 4.81 to 5.03 ms: twice the registers, half the occupancy.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "pdl.cuh"

#define WARPS 4
#define UNROLL 4

__device__ __forceinline__ void unpack8(const uint4& u, float* f, const __nv_bfloat16*) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __bfloat1622float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}

__device__ __forceinline__ void unpack8(const uint4& u, float* f, const __half*) {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 v = __half22float2(h[i]);
        f[2 * i] = v.x;
        f[2 * i + 1] = v.y;
    }
}


template <typename T, int M, int NPW>
__device__ void gemv(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, uint32_t N, uint32_t K) {
    const uint32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const uint32_t n0 = (blockIdx.x * WARPS + warp) * NPW;
    pdl_wait();
    pdl_trigger();
    if (n0 >= N) return;
    float acc[M][NPW];
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int j = 0; j < NPW; j++) acc[m][j] = 0.f;
    const uint4* wr[NPW];
#pragma unroll
    for (int j = 0; j < NPW; j++) {
        const uint32_t n = min(n0 + j, N - 1);  // past N: a duplicate column, never written
        wr[j] = reinterpret_cast<const uint4*>(w + (size_t)n * K);
    }
    const uint32_t runs = K / 8;  // 16-byte runs per row
    for (uint32_t r0 = lane; r0 < runs; r0 += 32 * UNROLL) {
        uint4 wv[UNROLL][NPW];
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const uint32_t r = r0 + 32 * u;
#pragma unroll
            for (int j = 0; j < NPW; j++) wv[u][j] = r < runs ? __ldcs(wr[j] + r) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; u++) {
            const uint32_t r = r0 + 32 * u;
            if (r >= runs) break;
#pragma unroll
            for (int m = 0; m < M; m++) {
                float xf[8];
                unpack8(__ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K) + r), xf, (const T*)nullptr);
#pragma unroll
                for (int j = 0; j < NPW; j++) {
                    float wf[8];
                    unpack8(wv[u][j], wf, (const T*)nullptr);
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[m][j] = fmaf(xf[e], wf[e], acc[m][j]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int j = 0; j < NPW; j++) {
            float v = acc[m][j];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            acc[m][j] = v;
        }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < M; m++)
#pragma unroll
            for (int j = 0; j < NPW; j++)
                if (n0 + j < N) y[(size_t)m * N + n0 + j] = from_f<T>(acc[m][j]);
    }
}

#define GEMV(T, SUFFIX, M, NPW)                                                                        \
    extern "C" __global__ void __launch_bounds__(WARPS * 32)                                           \
        gemv_##SUFFIX##_m##M(T* y, const T* x, const T* w, uint32_t N, uint32_t K) {                   \
        gemv<T, M, NPW>(y, x, w, N, K);                                                                \
    }

#define INSTANTIATE(T, SUFFIX) \
    GEMV(T, SUFFIX, 1, 2)      \
    GEMV(T, SUFFIX, 2, 2)      \
    GEMV(T, SUFFIX, 3, 4)      \
    GEMV(T, SUFFIX, 4, 4)      \
    GEMV(T, SUFFIX, 5, 4)      \
    GEMV(T, SUFFIX, 6, 4)      \
    GEMV(T, SUFFIX, 7, 4)      \
    GEMV(T, SUFFIX, 8, 4)

INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
