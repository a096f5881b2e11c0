/* SwiGLU activation over a fused gate|up projection: y[r][f] = bf16(bf16(silu(g)) * u) with
 * g = gu[r][f], u = gu[r][F + f] (bf16). The same two roundings as torch's
 * ``F.silu(gate) * up`` in bf16, in one pass instead of four ops (chunk, silu, multiply,
 * and the copy that makes the result contiguous for the next matmul). */
#include <math.h>
#include <stdint.h>

#include "kernel_util.h"

/* gu: [R, 2F] bf16 (gate columns, then up columns); y: [R, F] bf16. */
void silu_mul_bf16(const uint16_t *gu, uint16_t *y, int64_t R, int64_t F, int nthreads) {
    #pragma omp parallel for num_threads(R * F >= (1 << 16) ? nthreads : 1) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *g = gu + r * 2 * F, *u = g + F;
        uint16_t *yr = y + r * F;
        for (int64_t f = 0; f < F; f++) {
            const float x = bf16_to_f32(g[f]);
            const float s = bf16_to_f32(f32_to_bf16(x / (1.0f + expf(-x))));
            yr[f] = f32_to_bf16(s * bf16_to_f32(u[f]));
        }
    }
}
