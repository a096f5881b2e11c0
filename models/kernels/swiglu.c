/* SwiGLU activation over a fused gate|up projection: y[r][f] = bf16(bf16(silu(g)) * u) with
 * g = gu[r][f], u = gu[r][F + f] (bf16). The same two roundings as torch's
 * ``F.silu(gate) * up`` in bf16, in one pass instead of four ops (chunk, silu, multiply,
 * and the copy that makes the result contiguous for the next matmul). Sixteen values at a
 * time with a vector exp: the scalar expf loop took 52 us for one decode token's 6 x 2816
 * routed gate|up values (measured), ~1.4 ms per V2-Lite step. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "kernel_util.h"

/* e^x for 16 lanes, within ~2 ulp of expf over the range silu needs: x = n ln2 + r with
 * |r| <= ln2 / 2 (ln2 split in two for an exact reduction), a degree-6 polynomial for e^r,
 * then the exponent n applied by scalef (which also gives 0 / inf past the float range, so
 * silu(-inf) is NaN and silu of a large negative value -0, as torch has them). */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-103.9f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16_round(__m512 v) { /* to bf16 (nearest even) and back */
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* gu: [R, 2F] bf16 (gate columns, then up columns); y: [R, F] bf16. */
void silu_mul_bf16(const uint16_t *gu, uint16_t *y, int64_t R, int64_t F, int nthreads) {
    #pragma omp parallel for num_threads(R * F >= (1 << 16) ? nthreads : 1) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *g = gu + r * 2 * F, *u = g + F;
        uint16_t *yr = y + r * F;
        int64_t f = 0;
        for (; f + 16 <= F; f += 16) {
            const __m512 x = bf16x16_to_f32(g + f);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
            const __m512 s = bf16_round(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            const __m512 out = _mm512_mul_ps(s, bf16x16_to_f32(u + f));
            _mm256_storeu_si256((__m256i *)(yr + f), (__m256i)_mm512_cvtneps_pbh(out));
        }
        for (; f < F; f++) {
            const float x = bf16_to_f32(g[f]);
            const float s = bf16_to_f32(f32_to_bf16(x / (1.0f + expf(-x))));
            yr[f] = f32_to_bf16(s * bf16_to_f32(u[f]));
        }
    }
}
