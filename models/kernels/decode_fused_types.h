/* decode_fused.c's layer and step descriptors (built by fused_decode.py), the other kernels
 * it calls, and its optional timing. Private to decode_fused.c: included once, there. */
#ifndef LLAMA_MPI_DECODE_FUSED_TYPES_H
#define LLAMA_MPI_DECODE_FUSED_TYPES_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kernel_util.h"

/* the other sources of the library */
int quantize_rows_q8(const void *X, int x_is_bf16, int64_t ldx, int64_t M, int64_t K,
                     int8_t *xq, float *xd, int32_t *xsum, int nthreads);
int quant_matmul(int qtype, const uint8_t *W, int64_t row_bytes, const int8_t *xq,
                 const float *xd, const int32_t *xsum, void *Y, int64_t ldy, int y_is_bf16,
                 int64_t M, int64_t N, int64_t K, int nthreads);
int grouped_quant_matmul(int qtype, const uint8_t *W, int64_t expert_bytes, int64_t row_bytes,
                         const int64_t *idx, const int64_t *start, int64_t G, const int8_t *xq,
                         const float *xd, const int32_t *xsum, void *Y, int64_t ldy,
                         int y_is_bf16, int64_t N, int64_t K, int nthreads);
void skinny_bf16_matmul(const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t M,
                        int64_t N, int64_t K, int nthreads);
void grouped_bf16_matmul(const uint16_t *W, const int64_t *idx, const int64_t *start,
                         const uint16_t *X, uint16_t *Y, int64_t G, int64_t N, int64_t K,
                         int nthreads);
void batched_skinny_bf16_matmul(const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t B,
                                int64_t M, int64_t N, int64_t K, int nthreads);
int mla_attention_bf16(const uint16_t *q, const uint16_t *kv, const int64_t *slots,
                       const int64_t *row_start, const int64_t *row_len, uint16_t *out,
                       int64_t R, int64_t H, int64_t D, int64_t C, float scale, int nthreads);
void rms_norm_bf16(const void *x, int x_bf16, int64_t x_stride, const uint16_t *w, uint16_t *y,
                   int64_t T, int64_t E, float eps, int nthreads);
void silu_mul_bf16(const uint16_t *gu, uint16_t *y, int64_t R, int64_t F, int nthreads);

#define MAXT 16
#define MAXP 4
#define FERR_NOMEM (-3)
#define FERR_SHAPE (-2)
#define DENSE 0
#define PAR_WORK (1 << 17) /* multiply-adds below which a product runs on one thread */

/* One row part of a weight: GGUF blocks of type `kind` (2..14), or DENSE (compute dtype).
 * Row n of expert e starts at data + e * expert_bytes + n * row_bytes. */
typedef struct {
    int64_t kind, rows, row_bytes, expert_bytes;
    const void *data;
} fpart_t;

typedef struct {
    int64_t nparts, N, K;
    fpart_t p[MAXP];
} fmat_t;

/* Everything of one layer; built once at load by fused_decode.py (all fields 8 bytes). */
typedef struct {
    int64_t E, H, C, R, Dn, Dv, Q, bf16, naive;
    double eps, scale;
    const void *attn_norm, *ffn_norm, *q_a_norm, *kv_a_norm, *k_b, *v_b;
    fmat_t x_proj, q_b, o;
    int64_t moe, has_shared, complete;
    fmat_t gate_up, down; /* the dense FFN, or the shared experts */
    const float *router_w, *router_bias;
    int64_t X, top_k, groups, groups_used, sigmoid, top2sum, normalize;
    double rscale; /* 0: no scaling */
    fmat_t eg, ed; /* stacked routed experts held here: gate|up [n, 2Fe, E], down [n, E, Fe] */
    int64_t first, count, Fe;
    int64_t index; /* the layer's number (profile counters) */
} layer_t;

/* Per decode step, shared by every layer. */
typedef struct {
    int64_t T;
    const int64_t *slot_mapping; /* [T] pool slot of each new token */
    const float *rope;           /* [T, R/2, 2] cos, sin */
    const int64_t *ctx_slots, *ctx_start, *ctx_len; /* row r attends to
                                                       ctx_slots[ctx_start[r] + 0 .. len) */
    int64_t nthreads;
} step_t;

/* ---- optional timing (run/profile_tg.py): per layer, nanoseconds in the whole call, in the
 * weight products, their number, and nanoseconds in attention over the latent cache ---- */

#define PROF_LAYERS 512
static int prof_on = 0;
static double prof[PROF_LAYERS][4];
static double *prof_cur = NULL;

static inline double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

#define WEIGHT(stmt) \
    do { \
        const double t0_ = prof_cur ? now_ns() : 0.0; \
        stmt; \
        if (prof_cur) prof_cur[1] += now_ns() - t0_, prof_cur[2] += 1; \
    } while (0)

/* on: 1 starts (and zeroes) the counters, 0 stops them; stats: [PROF_LAYERS, 4] copied out */
void fused_decode_profile(int on, double *stats) {
    if (stats) memcpy(stats, prof, sizeof(prof));
    if (on) memset(prof, 0, sizeof(prof));
    prof_on = on;
}


#endif
