/* Helpers shared by the C kernels: bf16 <-> float32, and a thread's share of a range. */
#ifndef LLAMA_MPI_KERNEL_UTIL_H
#define LLAMA_MPI_KERNEL_UTIL_H

#include <immintrin.h>
#include <stdint.h>

/* float32 -> bf16 bit pattern, rounded to nearest even (NaN stays NaN) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    __builtin_memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
}

/* 16 bf16 values -> 16 float32 lanes (AVX-512) */
static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Inside an OpenMP parallel region: this thread's contiguous share [*lo, *hi) of n items,
 * shares rounded up to a multiple of `align` (a power of two). */
static inline void thread_share(int64_t n, int64_t align, int64_t *lo, int64_t *hi) {
    int t = 0, T = 1;
#ifdef _OPENMP
    extern int omp_get_thread_num(void);
    extern int omp_get_num_threads(void);
    t = omp_get_thread_num();
    T = omp_get_num_threads();
#endif
    const int64_t per = ((n + T - 1) / T + align - 1) & ~(align - 1);
    *lo = t * per < n ? t * per : n;
    *hi = *lo + per < n ? *lo + per : n;
}

#endif
