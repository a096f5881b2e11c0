/* RMSNorm with a bf16 weight: y = bf16(bf16(x / rms(x)) * w), x float32 or bf16.
 *
 * The same two roundings as the torch form (normalise in float32, round to the weight's
 * dtype, multiply by the weight in bf16); only the summation order of the mean square
 * differs. One call replaces ~5 torch ops, which in a decode step (13 norms) cost ~50 us
 * each with caches cold from streaming weights. Rows may be strided (a slice
 * of a wider projection output); the last dimension is contiguous.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "kernel_util.h"

static void norm_row(const void *x, int x_bf16, const uint16_t *w, uint16_t *y, int64_t E,
                     float eps) {
    const float *xf = (const float *)x;
    const uint16_t *xh = (const uint16_t *)x;
    double ss = 0.0; /* float64 sum: the order differs from torch's, the magnitude does not */
    for (int64_t e = 0; e < E; e++) {
        float v = x_bf16 ? bf16_to_f32(xh[e]) : xf[e];
        ss += (double)v * v;
    }
    const float r = 1.0f / sqrtf((float)(ss / (double)E) + eps);
    for (int64_t e = 0; e < E; e++) {
        float v = x_bf16 ? bf16_to_f32(xh[e]) : xf[e];
        y[e] = f32_to_bf16(bf16_to_f32(f32_to_bf16(v * r)) * bf16_to_f32(w[e]));
    }
}

/* x: T rows of E values, row r at x + r * x_stride elements (float32 or bf16); w: [E] bf16;
 * y: [T, E] bf16 contiguous. */
void rms_norm_bf16(const void *x, int x_bf16, int64_t x_stride, const uint16_t *w, uint16_t *y,
                   int64_t T, int64_t E, float eps, int nthreads) {
    const int64_t esize = x_bf16 ? 2 : 4;
    #pragma omp parallel for num_threads(T * E >= (1 << 16) ? nthreads : 1) schedule(static)
    for (int64_t r = 0; r < T; r++)
        norm_row((const char *)x + r * x_stride * esize, x_bf16, w, y + r * E, E, eps);
}
