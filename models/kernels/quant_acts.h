/* Activation rows laid out like the weights' transposed chunks (quant_blocks.h): what
 * quant_matmul.c multiplies the unpacked weight registers with. */
#ifndef LLAMA_MPI_QUANT_ACTS_H
#define LLAMA_MPI_QUANT_ACTS_H

#include "quant_blocks.h"

/* Activation rows in the weights' transposed layout, per row: xt [nch * chunk] int8, then per
 * lane (16 per chunk) xv = block scale, xi = -offset * sum (int32 accumulator start),
 * xs = scale * sum (for the separate min term). */
typedef struct {
    int8_t *xt;
    float *xv, *xs;
    int32_t *xi;
    int64_t nch, chunk;
} act_t;

static inline int act_alloc(act_t *a, int64_t R, int64_t nch, int64_t chunk) {
    a->nch = nch;
    a->chunk = chunk;
    const size_t tb = (size_t)(R * nch * chunk), lb = (size_t)(R * nch * 16 * 4);
    uint8_t *p = aligned_alloc(64, tb + 3 * lb + 64);
    if (!p) return QERR_NOMEM;
    a->xt = (int8_t *)p;
    a->xv = (float *)(p + tb);
    a->xs = (float *)(p + tb + lb);
    a->xi = (int32_t *)(p + tb + 2 * lb);
    return 0;
}

static inline void act_layout(int qtype, const int8_t *xq, const float *xd, const int32_t *xsum,
                       int64_t R, int64_t K, act_t *a) {
    const int64_t nch = a->nch, ck = a->chunk;
    const int regs = chunk_regs_of(qtype), glen = (int)ck / 16; /* elements per group */
    for (int64_t r = 0; r < R; r++) {
        const int8_t *q = xq + r * K;
        int8_t *t = a->xt + r * nch * ck;
        for (int64_t c = 0; c < nch; c++)
            for (int l = 0; l < 16; l++) {
                const int64_t g = 16 * c + lane_group(qtype, l); /* the lane's group in the row */
                const int64_t lane = r * nch * 16 + 16 * c + l;
                const int valid = g * glen < K;
                for (int k = 0; k < regs; k++) {
                    int8_t *dst = t + c * ck + 64 * k + 4 * l;
                    if (valid)
                        memcpy(dst, q + g * glen + 4 * k, 4);
                    else
                        memset(dst, 0, 4);
                }
                if (!valid) {
                    a->xv[lane] = a->xs[lane] = 0.0f;
                    a->xi[lane] = 0;
                    continue;
                }
                const int32_t *sr = xsum + r * (K / 16);
                const int32_t sum = glen == 32 ? sr[2 * g] + sr[2 * g + 1] : sr[g];
                const float d = xd[r * (K / 32) + (glen == 32 ? g : g / 2)];
                a->xv[lane] = d;
                a->xs[lane] = d * (float)sum;
                a->xi[lane] = -offset_of(qtype) * sum;
            }
    }
}

#endif
