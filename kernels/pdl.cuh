// Programmatic dependent launch (sm_90+): overlapping a kernel's start with the end of the one
// before it on the stream.
//
// A kernel launched with the programmatic-stream-serialization attribute (the skinny GEMM,
// src/engine/cuda/pdl.rs) may start once every block of the kernel before it has called
// pdl_trigger() (or exited), instead of when that kernel has finished. Until its pdl_wait()
// returns, it must touch no memory an earlier kernel writes or reads (the skinny GEMM only
// waits first thing); pdl_wait() returns once every earlier kernel has finished and its writes
// are visible. Kernels that precede a skinny GEMM call pdl_trigger() first thing. In a kernel
// launched without the attribute both are no-ops, and so is pdl_trigger() when the next kernel
// is launched without it. Opt-in (src/engine/cuda/pdl.rs says why).
#pragma once

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}
