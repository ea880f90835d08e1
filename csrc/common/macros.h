// Portability macros shared by CPU and CUDA translation units.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDMTL_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the per-element math is instantiated in translation units compiled for different
// instruction sets; forcing it inline keeps an AVX-512 copy from being shared with a default one.
#define FUSEDMTL_HOST_DEVICE inline __attribute__((always_inline))
#endif

#define FUSEDMTL_CONCAT_IMPL(a, b) a##b
#define FUSEDMTL_CONCAT(a, b) FUSEDMTL_CONCAT_IMPL(a, b)
