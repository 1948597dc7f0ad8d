// Fused elementwise steps of a Llama layer on CUDA: each replaces two to four candle launches
// of a decode step (a step at batch 1 is ~17 launches per layer; each boundary costs a launch
// gap and a ramp, which at 32 layers is most of the distance to the memory floor).
//
//   add_rmsnorm:  s = round(x + a);  h = round(s * rsqrt(mean(s^2) + eps) * w)
//                 out = [s; h]  ([2, N, W]: the new residual stream, then the next norm's input)
//   silu_mul:     out[t, c] = round(silu(gu[t, c]) * gu[t, I + c])     (gu = [gate | up])
//   rope_store:   qkv[t] = [q heads | k heads | v heads] (one fused projection's row);
//                 q, k rotated by the row's (cos, sin) (HF rotate_half), v copied;
//                 out = [q_rot (N*H*D) | k_rot (N*KVH*D) | v (N*KVH*D)];
//                 kc[slot[t]] = k_rot[t], vc[slot[t]] = v[t] unless slot[t] == SKIP_SLOT
//
// Each op optionally takes `delta` [N, width of its input] f32: the LoRA update of the
// projection it consumes (kernels/lora.cu lora_delta), added to that input and rounded first.
//
// Every sum and product is f32 with one rounding to T per output, row by row: a row's result
// does not depend on the batch size or its neighbours.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "convert.cuh"
#include "pdl.cuh"

#define SKIP_SLOT 0xffffffffu

// A projection's output with its LoRA update (f32, from lora_delta) added and rounded once, as
// the in-place expand does; no update: the value as is.
template <typename T>
__device__ __forceinline__ float with_delta(T v, const float* delta, size_t i) {
    return delta ? to_f(from_f<T>(to_f(v) + delta[i])) : to_f(v);
}
#define NORM_THREADS 512

// Block per row t. The sum of squares goes through each warp's butterfly then warp 0's, a
// fixed order.
template <typename T>
__device__ void add_rmsnorm(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ a,
                            const float* __restrict__ delta, const T* __restrict__ w, uint32_t N, uint32_t W,
                            float eps) {
    pdl_trigger();  // a skinny GEMM may follow (pdl.cuh)
    const uint32_t t = blockIdx.x;
    const T* xr = x + (size_t)t * W;
    const T* ar = a + (size_t)t * W;
    T* sr = out + (size_t)t * W;
    T* hr = out + (size_t)N * W + (size_t)t * W;
    float ss = 0.f;
    for (uint32_t i = threadIdx.x; i < W; i += blockDim.x) {
        const T s = from_f<T>(to_f(xr[i]) + with_delta(ar[i], delta, (size_t)t * W + i));
        sr[i] = s;
        const float f = to_f(s);
        ss = fmaf(f, f, ss);
    }
    __shared__ float warp_sums[32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sums[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        float v = lane < blockDim.x / 32 ? warp_sums[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
        if (lane == 0) warp_sums[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(warp_sums[0] / (float)W + eps);
    // Each thread re-reads the values it wrote itself (same index set), so no barrier is needed.
    for (uint32_t i = threadIdx.x; i < W; i += blockDim.x) hr[i] = from_f<T>(to_f(sr[i]) * inv * to_f(w[i]));
}

template <typename T>
__device__ void silu_mul(T* __restrict__ out, const T* __restrict__ gu, const float* __restrict__ delta, uint32_t N,
                         uint32_t I) {
    pdl_trigger();  // a skinny GEMM may follow (pdl.cuh)
    const size_t total = (size_t)N * I;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / I, c = e % I;
        const float g = with_delta(gu[t * 2 * I + c], delta, t * 2 * I + c);
        const float u = with_delta(gu[t * 2 * I + I + c], delta, t * 2 * I + I + c);
        out[e] = from_f<T>(g / (1.f + __expf(-g)) * u);
    }
}

// Block per row t: first the (H + KVH) * D / 2 rotation pairs of q and k, then the KVH * D
// values of v. cos, sin: [N, D / 2] (the row's position's table row).
template <typename T>
__device__ void rope_store(T* __restrict__ out, T* __restrict__ kc, T* __restrict__ vc, const T* __restrict__ qkv,
                           const float* __restrict__ delta, const T* __restrict__ cos, const T* __restrict__ sin, const uint32_t* __restrict__ slots,
                           uint32_t N, uint32_t H, uint32_t KVH, uint32_t D) {
    const uint32_t t = blockIdx.x, half = D / 2;
    const uint32_t width = (H + 2 * KVH) * D, kvw = KVH * D;
    const T* row = qkv + (size_t)t * width;
    const uint32_t slot = slots[t];
    T* q_out = out + (size_t)t * H * D;
    T* k_out = out + (size_t)N * H * D + (size_t)t * kvw;
    T* v_out = out + (size_t)N * (H * D + kvw) + (size_t)t * kvw;
    for (uint32_t p = threadIdx.x; p < (H + KVH) * half; p += blockDim.x) {
        const uint32_t head = p / half, i = p % half;
        const uint32_t col = head * D + i;
        const size_t base = (size_t)t * width + col;
        const float x1 = with_delta(row[col], delta, base), x2 = with_delta(row[col + half], delta, base + half);
        const float c = to_f(cos[(size_t)t * half + i]), s = to_f(sin[(size_t)t * half + i]);
        const T o1 = from_f<T>(x1 * c - x2 * s);
        const T o2 = from_f<T>(x1 * s + x2 * c);
        if (head < H) {
            q_out[col] = o1;
            q_out[col + half] = o2;
        } else {
            const uint32_t kcol = (head - H) * D + i;
            k_out[kcol] = o1;
            k_out[kcol + half] = o2;
            if (slot != SKIP_SLOT) {
                kc[(size_t)slot * kvw + kcol] = o1;
                kc[(size_t)slot * kvw + kcol + half] = o2;
            }
        }
    }
    const T* vr = row + (H + KVH) * D;
    for (uint32_t e = threadIdx.x; e < kvw; e += blockDim.x) {
        const T v = from_f<T>(with_delta(vr[e], delta, (size_t)t * width + (H + KVH) * D + e));
        v_out[e] = v;
        if (slot != SKIP_SLOT) vc[(size_t)slot * kvw + e] = v;
    }
}

#define FUSED(T, SUFFIX)                                                                                       \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) add_rmsnorm_##SUFFIX(                           \
        T* out, const T* x, const T* a, const float* delta, const T* w, uint32_t N, uint32_t W, float eps) {   \
        add_rmsnorm<T>(out, x, a, delta, w, N, W, eps);                                                        \
    }                                                                                                          \
    extern "C" __global__ void silu_mul_##SUFFIX(T* out, const T* gu, const float* delta, uint32_t N,         \
                                                 uint32_t I) {                                                 \
        silu_mul<T>(out, gu, delta, N, I);                                                                     \
    }                                                                                                          \
    extern "C" __global__ void rope_store_##SUFFIX(T* out, T* kc, T* vc, const T* qkv, const float* delta,    \
                                                   const T* cos, const T* sin, const uint32_t* slots,          \
                                                   uint32_t N, uint32_t H, uint32_t KVH, uint32_t D) {         \
        rope_store<T>(out, kc, vc, qkv, delta, cos, sin, slots, N, H, KVH, D);                                 \
    }

FUSED(float, f32)
FUSED(__nv_bfloat16, bf16)
FUSED(__half, f16)
