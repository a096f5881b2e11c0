/* decode_fused.c's building blocks: element access in the compute dtype, weight products
 * over a layer's row parts (quantized, bf16 or float32), and the small steps (norm, RoPE,
 * SwiGLU, softmax). Private to decode_fused.c: included once, there (static, one unit). */
#ifndef LLAMA_MPI_DECODE_FUSED_OPS_H
#define LLAMA_MPI_DECODE_FUSED_OPS_H

#include "decode_fused_types.h"

/* ---- element access in the compute dtype ---- */

static inline float ld(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int bf16, int64_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline float rnd(int bf16, float v) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline int threads_for(int64_t work, int nt) { return work >= PAR_WORK ? nt : 1; }

/* float32 dot product of n values */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= n; k += 16)
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc);
    if (k < n) {
        const __mmask16 m = (__mmask16)((1u << (n - k)) - 1u);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k),
                              acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Y[m, n] = X[m, :] . W[n, :] in float32; W rows ldw apart, X rows ldx, Y rows ldy. */
static void gemm_f32(const float *W, int64_t ldw, const float *X, int64_t ldx, float *Y,
                     int64_t ldy, int64_t M, int64_t N, int64_t K, int nt) {
    #pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++) Y[m * ldy + n] = dot_f32(X + m * ldx, W + n * ldw, K);
}

/* ---- weight products ---- */

typedef struct { /* activation rows quantized once for every quantized weight they meet */
    int8_t *q;
    float *d;
    int32_t *s;
    int64_t M, K;
} qact_t;

static void qact_free(qact_t *a) {
    free(a->q), free(a->d), free(a->s);
    a->q = NULL, a->d = NULL, a->s = NULL;
}

static int qact_make(qact_t *a, const void *X, int bf16, int64_t ldx, int64_t M, int64_t K,
                     int nt) {
    if (a->q) return 0;
    a->q = malloc((size_t)(M * K)), a->d = malloc(sizeof(float) * (size_t)(M * K / 32));
    a->s = malloc(sizeof(int32_t) * (size_t)(M * K / 16)), a->M = M, a->K = K;
    if (!a->q || !a->d || !a->s) return FERR_NOMEM;
    return quantize_rows_q8(X, bf16, ldx, M, K, a->q, a->d, a->s, nt);
}

static int mat_has_quant(const fmat_t *w) {
    for (int64_t i = 0; i < w->nparts; i++)
        if (w->p[i].kind != DENSE) return 1;
    return 0;
}

/* Y [M, N] (row stride ldy, compute dtype) = X [M, K] (rows ldx apart) @ W.T. `qa`: the
 * rows' int8 form, made on first need (NULL: do not keep it). */
static int mat_mul(const fmat_t *w, int bf16, const void *X, int64_t ldx, int64_t M, void *Y,
                   int64_t ldy, qact_t *qa, int nt) {
    const int64_t es = bf16 ? 2 : 4, K = w->K;
    qact_t local = {0};
    qact_t *a = qa ? qa : &local;
    int err = 0;
    int64_t col = 0;
    for (int64_t i = 0; i < w->nparts && !err; i++) {
        const fpart_t *p = &w->p[i];
        char *y = (char *)Y + col * es;
        const int t = threads_for(p->rows * K * M, nt);
        if (p->kind != DENSE) {
            err = qact_make(a, X, bf16, ldx, M, K, nt);
            if (!err)
                WEIGHT(err = quant_matmul((int)p->kind, p->data, p->row_bytes, a->q, a->d,
                                          a->s, y, ldy, bf16, M, p->rows, K, t));
        } else if (!bf16) {
            WEIGHT(gemm_f32(p->data, p->row_bytes / 4, X, ldx, (float *)y, ldy, M, p->rows, K,
                            t));
        } else {
            /* the bf16 kernel takes contiguous X [M, K] and writes contiguous Y [M, N] */
            const uint16_t *x = X;
            uint16_t *xc = NULL, *yc = NULL;
            if (ldx != K) {
                xc = malloc(2 * (size_t)(M * K));
                if (!xc) return FERR_NOMEM;
                for (int64_t m = 0; m < M; m++) memcpy(xc + m * K, x + m * ldx, 2 * (size_t)K);
                x = xc;
            }
            if (ldy != p->rows) yc = malloc(2 * (size_t)(M * p->rows));
            if (ldy != p->rows && !yc) {
                free(xc);
                return FERR_NOMEM;
            }
            WEIGHT(skinny_bf16_matmul(p->data, x, yc ? yc : (uint16_t *)y, M, p->rows, K, t));
            if (yc)
                for (int64_t m = 0; m < M; m++)
                    memcpy((uint16_t *)y + m * ldy, yc + m * p->rows, 2 * (size_t)p->rows);
            free(xc), free(yc);
        }
        col += p->rows;
    }
    qact_free(&local);
    return err;
}

/* Grouped product over stacked experts: rows start[g] .. start[g+1] of X (contiguous [R, K],
 * int8 form in `qa` where a part is quantized) times expert idx[g] into Y [R, N] (ldy). */
static int mat_grouped(const fmat_t *w, int bf16, const void *X, qact_t *qa,
                       const int64_t *idx, const int64_t *start, int64_t G, void *Y,
                       int64_t ldy, int nt) {
    const int64_t es = bf16 ? 2 : 4, K = w->K, R = start[G];
    int err = 0;
    int64_t col = 0;
    for (int64_t i = 0; i < w->nparts && !err; i++) {
        const fpart_t *p = &w->p[i];
        char *y = (char *)Y + col * es;
        const int t = threads_for(p->rows * K * R, nt);
        if (p->kind != DENSE) {
            WEIGHT(err = grouped_quant_matmul((int)p->kind, p->data, p->expert_bytes,
                                              p->row_bytes, idx, start, G, qa->q, qa->d, qa->s,
                                              y, ldy, bf16, p->rows, K, t));
        } else if (bf16 && ldy == p->rows && p->row_bytes == 2 * K
                   && p->expert_bytes == p->row_bytes * p->rows) {
            WEIGHT(grouped_bf16_matmul(p->data, idx, start, X, (uint16_t *)y, G, p->rows, K,
                                       t));
        } else {
            for (int64_t g = 0; g < G && !err; g++) {
                const int64_t m = start[g + 1] - start[g];
                if (!m) continue;
                fmat_t one = {1, p->rows, K, {*p}};
                one.p[0].data = (const char *)p->data + idx[g] * p->expert_bytes;
                err = mat_mul(&one, bf16, (const char *)X + start[g] * K * es, K, m,
                              y + start[g] * ldy * es, ldy, NULL, nt);
            }
        }
        col += p->rows;
    }
    return err;
}

/* ---- small steps ---- */

/* RMSNorm of T rows (x rows ldx apart, float32 or bf16) times the weight, into y [T, E]. */
static void rms_norm(const void *x, int x_bf16, int64_t ldx, const void *w, int bf16, void *y,
                     int64_t T, int64_t E, float eps) {
    if (bf16) {
        rms_norm_bf16(x, x_bf16, ldx, w, y, T, E, eps, 1);
        return;
    }
    for (int64_t t = 0; t < T; t++) { /* float32: normalise, then times the weight */
        double ss = 0.0;
        for (int64_t e = 0; e < E; e++) {
            const float v = ld(x, x_bf16, t * ldx + e);
            ss += (double)v * v;
        }
        const float r = 1.0f / sqrtf((float)(ss / (double)E) + eps);
        for (int64_t e = 0; e < E; e++)
            ((float *)y)[t * E + e] = ((const float *)w)[e] * (ld(x, x_bf16, t * ldx + e) * r);
    }
}

/* Interleaved-pair rotation of n values at src by (cos, sin) pairs cs, into dst. */
static void rope(const void *src, void *dst, int bf16, const float *cs, int64_t n) {
    for (int64_t i = 0; i < n / 2; i++) {
        const float a = ld(src, bf16, 2 * i), b = ld(src, bf16, 2 * i + 1);
        const float c = cs[2 * i], s = cs[2 * i + 1];
        st(dst, bf16, 2 * i, a * c - b * s);
        st(dst, bf16, 2 * i + 1, a * s + b * c);
    }
}

static void silu_mul(const void *gu, void *y, int bf16, int64_t R, int64_t F) {
    if (bf16) {
        silu_mul_bf16(gu, y, R, F, 1);
        return;
    }
    for (int64_t r = 0; r < R; r++)
        for (int64_t f = 0; f < F; f++) {
            const float g = ((const float *)gu)[r * 2 * F + f];
            const float u = ((const float *)gu)[r * 2 * F + F + f];
            ((float *)y)[r * F + f] = g / (1.0f + expf(-g)) * u;
        }
}

/* In-place softmax of n float32 scores. */
static void softmax(float *s, int64_t n) {
    float mx = -INFINITY, sum = 0.0f;
    for (int64_t l = 0; l < n; l++) mx = s[l] > mx ? s[l] : mx;
    for (int64_t l = 0; l < n; l++) sum += (s[l] = expf(s[l] - mx));
    const float inv = 1.0f / sum;
    for (int64_t l = 0; l < n; l++) s[l] *= inv;
}


#endif
