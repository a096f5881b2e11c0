/* One decode layer of DeepSeek-V2 in one call: everything between (and including) the weight
 * products of a layer for a batch of up to 16 token rows.
 *
 * The eager torch path runs ~50 small ops per layer for a decode step (norms, RoPE, cats,
 * the cache write, the router's top-k, SwiGLU, combine, residual adds), each a Python call
 * and often an OpenMP fork/join: ~0.4 ms per layer even when the weights are tiny. Here one C
 * call does the layer, calling the weight kernels of the other sources directly
 * (quant_matmul.c, bf16_gemv.c, mla_attention.c) and doing the small steps inline,
 * single-threaded where they are small.
 *
 * Numerics follow the eager path step by step: every intermediate that torch keeps in the
 * compute dtype (float32 or bf16) is rounded to it at the same point; the residual stream is
 * float32; the router runs in float32. What differs is summation order (and, in float32,
 * FMA contraction), so logits agree to float tolerance, not bit for bit.
 *
 * Collectives split a layer: mode bits choose the attention piece and/or the FFN piece, and
 * whether each adds into the residual x or writes its (TP/EP partial) output to `out`, which
 * the caller all-reduces and adds.
 */
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

/* ---- attention ---- */

/* Absorbed attention in float32 (the bf16 form is mla_attention_bf16): qf [T, H, C + R],
 * latents of the pool, o_lat [T, H, C]. */
static int absorbed_f32(const layer_t *L, const step_t *S, const float *qf, const float *kv,
                        float *o_lat) {
    const int64_t H = L->H, C = L->C, D = L->C + L->R;
    int64_t max_len = 1;
    for (int64_t t = 0; t < S->T; t++) max_len = S->ctx_len[t] > max_len ? S->ctx_len[t] : max_len;
    const int nt = threads_for(S->T * H * max_len * D * 2, (int)S->nthreads);
    int failed = 0;
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *s = malloc(sizeof(float) * (size_t)max_len);
        if (!s) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < S->T * H; it++) {
            if (!s) continue;
            const int64_t t = it / H;
            const int64_t *slots = S->ctx_slots + S->ctx_start[t], n = S->ctx_len[t];
            const float *q = qf + it * D;
            for (int64_t l = 0; l < n; l++)
                s[l] = dot_f32(q, kv + slots[l] * D, D) * (float)L->scale;
            softmax(s, n);
            float *o = o_lat + it * C;
            for (int64_t c = 0; c < C; c++) o[c] = 0.0f;
            for (int64_t l = 0; l < n; l++) {
                const float *row = kv + slots[l] * D, p = s[l];
                for (int64_t c = 0; c < C; c++) o[c] += p * row[c];
            }
        }
        free(s);
    }
    return failed ? FERR_NOMEM : 0;
}

/* Naive attention (keys and values expanded per head through k_b / v_b, as the eager naive
 * path): q [T, H, Dk] (nope | roped pe), out o [T, H * Dv], every intermediate rounded to the
 * compute dtype where torch rounds it. */
static int naive_attention(const layer_t *L, const step_t *S, const void *q, void *o,
                           const void *kv) {
    const int bf16 = (int)L->bf16;
    const int64_t H = L->H, C = L->C, R = L->R, Dn = L->Dn, Dv = L->Dv, D = C + R, Dk = Dn + R;
    int64_t max_len = 1;
    for (int64_t t = 0; t < S->T; t++) max_len = S->ctx_len[t] > max_len ? S->ctx_len[t] : max_len;
    const int nt = threads_for(S->T * H * max_len * C * (Dn + Dv), (int)S->nthreads);
    int failed = 0;
    #pragma omp parallel num_threads(nt) if (nt > 1)
    {
        float *s = malloc(sizeof(float) * (size_t)(max_len + C + Dn + Dv + Dk));
        if (!s) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < S->T * H; it++) {
            if (!s) continue;
            const int64_t t = it / H, h = it % H;
            const int64_t *slots = S->ctx_slots + S->ctx_start[t], n = S->ctx_len[t];
            float *c = s + max_len, *k = c + C, *acc = k + Dn, *qv = acc + Dv;
            for (int64_t d = 0; d < Dk; d++) qv[d] = ld(q, bf16, it * Dk + d);
            const float *kb = L->bf16 ? NULL : (const float *)L->k_b + h * C * Dn;
            for (int64_t l = 0; l < n; l++) {
                const int64_t row = slots[l] * D;
                for (int64_t j = 0; j < C; j++) c[j] = ld(kv, bf16, row + j);
                for (int64_t d = 0; d < Dn; d++) k[d] = 0.0f;
                for (int64_t j = 0; j < C; j++) { /* k_nope = c_kv @ k_b[h] ([C, Dn]) */
                    const float cj = c[j];
                    if (kb)
                        for (int64_t d = 0; d < Dn; d++) k[d] += cj * kb[j * Dn + d];
                    else
                        for (int64_t d = 0; d < Dn; d++)
                            k[d] += cj * ld(L->k_b, 1, (h * C + j) * Dn + d);
                }
                float sc = 0.0f;
                for (int64_t d = 0; d < Dn; d++) sc += qv[d] * rnd(bf16, k[d]);
                for (int64_t r = 0; r < R; r++) sc += qv[Dn + r] * ld(kv, bf16, row + C + r);
                s[l] = rnd(bf16, sc) * (float)L->scale;
            }
            softmax(s, n);
            for (int64_t j = 0; j < Dv; j++) acc[j] = 0.0f;
            for (int64_t l = 0; l < n; l++) {
                const int64_t row = slots[l] * D;
                for (int64_t j = 0; j < C; j++) c[j] = ld(kv, bf16, row + j);
                const float p = rnd(bf16, s[l]);
                for (int64_t j = 0; j < Dv; j++) { /* v = c_kv @ v_b[h].T ([Dv, C]) */
                    float v = 0.0f;
                    if (!bf16)
                        v = dot_f32(c, (const float *)L->v_b + (h * Dv + j) * C, C);
                    else
                        for (int64_t i = 0; i < C; i++)
                            v += c[i] * ld(L->v_b, 1, (h * Dv + j) * C + i);
                    acc[j] += p * rnd(bf16, v);
                }
            }
            for (int64_t j = 0; j < Dv; j++) st(o, bf16, (t * H + h) * Dv + j, acc[j]);
        }
        free(s);
    }
    return failed ? FERR_NOMEM : 0;
}

/* out[t, h, :] = W[h] ([N, K]) @ X[t, h, :] for every head; X rows of one token ldx apart
 * per head (head h of token t at X + (t * H + h) * ldx), Y likewise with ldy. */
static int per_head(const void *W, int bf16, const void *X, int64_t ldx, void *Y, int64_t ldy,
                    int64_t T, int64_t H, int64_t N, int64_t K, int nt) {
    if (bf16) { /* the batched kernel: X [H, T, K], Y [H, T, N], both contiguous */
        uint16_t *xt = malloc(2 * (size_t)(H * T * K)), *yt = malloc(2 * (size_t)(H * T * N));
        if (!xt || !yt) {
            free(xt), free(yt);
            return FERR_NOMEM;
        }
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++)
                memcpy(xt + (h * T + t) * K, (const uint16_t *)X + (t * H + h) * ldx,
                       2 * (size_t)K);
        WEIGHT(batched_skinny_bf16_matmul(W, xt, yt, H, T, N, K,
                                          threads_for(H * T * N * K, nt)));
        for (int64_t h = 0; h < H; h++)
            for (int64_t t = 0; t < T; t++)
                memcpy((uint16_t *)Y + (t * H + h) * ldy, yt + (h * T + t) * N, 2 * (size_t)N);
        free(xt), free(yt);
        return 0;
    }
    const int t1 = threads_for(H * T * N * K, nt);
    const double t0 = prof_cur ? now_ns() : 0.0;
    #pragma omp parallel for num_threads(t1) schedule(static) if (t1 > 1)
    for (int64_t h = 0; h < H; h++)
        gemm_f32((const float *)W + h * N * K, K, (const float *)X + h * ldx, H * ldx,
                 (float *)Y + h * ldy, H * ldy, T, N, K, 1);
    if (prof_cur) prof_cur[1] += now_ns() - t0, prof_cur[2] += 1;
    return 0;
}

/* The attention piece: attn [T, E] (compute dtype) = o(attention(norm(x))); writes the
 * step's latents into the layer's pool. */
static int attention(const layer_t *L, const step_t *S, const float *x, void *attn, void *pool) {
    const int bf16 = (int)L->bf16, nt = (int)S->nthreads;
    const int64_t T = S->T, E = L->E, H = L->H, C = L->C, R = L->R, Dn = L->Dn, Dv = L->Dv;
    const int64_t Dk = Dn + R, D = C + R, P = L->x_proj.N, es = bf16 ? 2 : 4;
    const float eps = (float)L->eps;
    int err = 0;
    char *h = malloc((size_t)(T * E * es)), *proj = malloc((size_t)(T * P * es));
    char *qn = NULL, *q = malloc((size_t)(T * H * Dk * es)), *qf = malloc((size_t)(T * H * D * es));
    char *ol = malloc((size_t)(T * H * C * es)), *o = malloc((size_t)(T * H * Dv * es));
    if (!h || !proj || !q || !qf || !ol || !o) err = FERR_NOMEM;
    if (!err) {
        rms_norm(x, 0, E, L->attn_norm, bf16, h, T, E, eps);
        err = mat_mul(&L->x_proj, bf16, h, E, T, proj, P, NULL, nt);
    }
    if (!err && L->Q) { /* q = q_b(norm(q_a)) */
        qn = malloc((size_t)(T * L->Q * es));
        if (!qn) err = FERR_NOMEM;
        if (!err) {
            rms_norm(proj, bf16, P, L->q_a_norm, bf16, qn, T, L->Q, eps);
            err = mat_mul(&L->q_b, bf16, qn, L->Q, T, q, H * Dk, NULL, nt);
        }
    } else if (!err) {
        for (int64_t t = 0; t < T; t++)
            memcpy(q + t * H * Dk * es, proj + t * P * es, (size_t)(H * Dk * es));
    }
    if (!err) {
        /* the latent and the roped shared key, straight into the pool */
        for (int64_t t = 0; t < T; t++) {
            const char *kv = proj + (t * P + P - D) * es;
            char *dst = (char *)pool + S->slot_mapping[t] * D * es;
            rms_norm(kv, bf16, 0, L->kv_a_norm, bf16, dst, 1, C, eps);
            rope(kv + C * es, dst + C * es, bf16, S->rope + t * R, R);
        }
        for (int64_t t = 0; t < T; t++) /* roped query parts, in place */
            for (int64_t hh = 0; hh < H; hh++) {
                char *pe = q + ((t * H + hh) * Dk + Dn) * es;
                rope(pe, pe, bf16, S->rope + t * R, R);
            }
    }
    const double t_att = prof_cur ? now_ns() : 0.0, w_att = prof_cur ? prof_cur[1] : 0.0;
    if (!err && L->naive) {
        err = naive_attention(L, S, q, o, pool);
    } else if (!err) {
        /* qf = (k_b[h] @ q_nope | q_pe) per head, then attention over the latents */
        err = per_head(L->k_b, bf16, q, Dk, qf, D, T, H, C, Dn, nt);
        for (int64_t t = 0; t < T * H && !err; t++)
            memcpy(qf + (t * D + C) * es, q + (t * Dk + Dn) * es, (size_t)(R * es));
        int64_t keys = 0; /* query-key pairs: small attention stays on one thread */
        for (int64_t t = 0; t < T; t++) keys += S->ctx_len[t];
        const int at = threads_for(keys * H * D * 2, nt);
        if (!err && bf16)
            err = mla_attention_bf16((const uint16_t *)qf, pool, S->ctx_slots, S->ctx_start,
                                     S->ctx_len, (uint16_t *)ol, T, H, D, C, (float)L->scale,
                                     at) ? FERR_NOMEM : 0;
        else if (!err)
            err = absorbed_f32(L, S, (const float *)qf, pool, (float *)ol);
        if (!err) /* o = v_b[h] @ o_lat per head */
            err = per_head(L->v_b, bf16, ol, C, o, Dv, T, H, Dv, C, nt);
    }
    if (prof_cur) prof_cur[3] += now_ns() - t_att - (prof_cur[1] - w_att); /* not k_b / v_b */
    if (!err) err = mat_mul(&L->o, bf16, o, H * Dv, T, attn, E, NULL, nt);
    free(h), free(proj), free(qn), free(q), free(qf), free(ol), free(o);
    return err;
}

/* ---- router ---- */

/* Expert choice of one token from its float32 logits [X]: ids [k] (global), weights [k]. */
static void route(const layer_t *L, float *logits, float *sel, int64_t *ids, float *w) {
    const int64_t X = L->X, k = L->top_k;
    if (L->sigmoid)
        for (int64_t j = 0; j < X; j++) logits[j] = 1.0f / (1.0f + expf(-logits[j]));
    else
        softmax(logits, X);
    for (int64_t j = 0; j < X; j++)
        sel[j] = logits[j] + (L->router_bias ? L->router_bias[j] : 0.0f);
    if (L->groups > 1 && L->groups_used < L->groups) {
        const int64_t G = L->groups, per = X / G;
        float gs[256];
        int keep[256];
        for (int64_t g = 0; g < G; g++) {
            float a = -INFINITY, b = -INFINITY; /* best and second best of the group */
            for (int64_t j = g * per; j < (g + 1) * per; j++) {
                if (sel[j] > a) b = a, a = sel[j];
                else if (sel[j] > b) b = sel[j];
            }
            gs[g] = L->top2sum ? a + b : a;
            keep[g] = 0;
        }
        for (int64_t u = 0; u < L->groups_used; u++) {
            int64_t best = -1;
            for (int64_t g = 0; g < G; g++)
                if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
            keep[best] = 1;
        }
        for (int64_t g = 0; g < G; g++)
            if (!keep[g])
                for (int64_t j = g * per; j < (g + 1) * per; j++) sel[j] = -INFINITY;
    }
    float sum = 0.0f;
    unsigned char taken[1024] = {0};
    for (int64_t i = 0; i < k; i++) { /* top-k by repeated argmax (k is small) */
        int64_t best = -1;
        for (int64_t j = 0; j < X; j++)
            if (!taken[j] && (best < 0 || sel[j] > sel[best])) best = j;
        ids[i] = best, w[i] = logits[best], sum += w[i], taken[best] = 1;
    }
    if (L->normalize) {
        const float d = sum > 6.103515625e-5f ? sum : 6.103515625e-5f;
        for (int64_t i = 0; i < k; i++) w[i] /= d;
    }
    if (L->rscale != 0.0)
        for (int64_t i = 0; i < k; i++) w[i] *= (float)L->rscale;
}

/* ---- FFN ---- */

/* y [T, E] (compute dtype) = down(silu(gate_up(h))), h [T, E]; qa: h's int8 form. */
static int swiglu(const fmat_t *gu, const fmat_t *dn, int bf16, const void *h, int64_t T,
                  void *y, qact_t *qa, int nt) {
    const int64_t F = gu->N / 2, es = bf16 ? 2 : 4;
    char *g = malloc((size_t)(T * 2 * F * es)), *s = malloc((size_t)(T * F * es));
    int err = g && s ? 0 : FERR_NOMEM;
    if (!err) err = mat_mul(gu, bf16, h, gu->K, T, g, 2 * F, qa, nt);
    if (!err) {
        silu_mul(g, s, bf16, T, F);
        err = mat_mul(dn, bf16, s, F, T, y, dn->N, NULL, nt);
    }
    free(g), free(s);
    return err;
}

/* The FFN piece. Dense: res [T, E] f32 = its output. MoE: routed [T, E] f32 (the weighted sum
 * of the experts held here) and shared [T, E] (compute dtype, or NULL without shared experts). */
static int moe(const layer_t *L, const step_t *S, const void *h, float *routed, void *shared) {
    const int bf16 = (int)L->bf16, nt = (int)S->nthreads;
    const int64_t T = S->T, E = L->E, X = L->X, k = L->top_k, Fe = L->Fe, es = bf16 ? 2 : 4;
    int err = 0;
    float *logits = malloc(sizeof(float) * (size_t)(T * X));
    float *sel = malloc(sizeof(float) * (size_t)X);
    float *hf = malloc(sizeof(float) * (size_t)(T * E));
    int64_t ids[MAXT * 64];
    float wts[MAXT * 64];
    if (!logits || !sel || !hf || k > 64) err = logits && sel && hf ? FERR_SHAPE : FERR_NOMEM;
    qact_t qa = {0};
    if (!err) { /* router in float32 */
        for (int64_t i = 0; i < T * E; i++) hf[i] = ld(h, bf16, i);
        WEIGHT(gemm_f32(L->router_w, E, hf, E, logits, X, T, X, E,
                        threads_for(T * X * E, nt)));
        for (int64_t t = 0; t < T; t++) route(L, logits + t * X, sel, ids + t * k, wts + t * k);
    }
    /* (token, slot) pairs grouped by local expert, experts in order of first appearance */
    int64_t gexp[MAXT * 64], gcount[MAXT * 64], G = 0, P = 0;
    int64_t ptok[MAXT * 64];
    float pw[MAXT * 64];
    if (!err) {
        int64_t slot_of[MAXT * 64];
        for (int64_t i = 0; i < T * k; i++) {
            const int64_t e = ids[i] - L->first;
            slot_of[i] = -1;
            if (e < 0 || e >= L->count) continue;
            int64_t g = 0;
            while (g < G && gexp[g] != e) g++;
            if (g == G) gexp[G] = e, gcount[G++] = 0;
            gcount[g]++, slot_of[i] = g;
        }
        int64_t start[MAXT * 64 + 1], fill[MAXT * 64];
        start[0] = 0;
        for (int64_t g = 0; g < G; g++) start[g + 1] = start[g] + gcount[g], fill[g] = start[g];
        P = start[G];
        for (int64_t i = 0; i < T * k; i++)
            if (slot_of[i] >= 0) {
                const int64_t p = fill[slot_of[i]]++;
                ptok[p] = i / k, pw[p] = wts[i];
            }
        for (int64_t i = 0; i < T * E; i++) routed[i] = 0.0f;
        if (P) {
            const int64_t K = E, F2 = L->eg.N;
            char *xs = malloc((size_t)(P * K * es)), *gu = malloc((size_t)(P * F2 * es));
            char *s = malloc((size_t)(P * Fe * es)), *y = malloc((size_t)(P * E * es));
            qact_t ga = {0};
            if (!xs || !gu || !s || !y) err = FERR_NOMEM;
            if (!err && (mat_has_quant(&L->eg) || (L->has_shared && mat_has_quant(&L->gate_up))))
                err = qact_make(&qa, h, bf16, E, T, E, nt);
            if (!err && mat_has_quant(&L->eg)) { /* gather the int8 rows: no requantization */
                ga.q = malloc((size_t)(P * K)), ga.d = malloc(sizeof(float) * (size_t)(P * K / 32));
                ga.s = malloc(sizeof(int32_t) * (size_t)(P * K / 16)), ga.M = P, ga.K = K;
                if (!ga.q || !ga.d || !ga.s) err = FERR_NOMEM;
                for (int64_t p = 0; p < P && !err; p++) {
                    memcpy(ga.q + p * K, qa.q + ptok[p] * K, (size_t)K);
                    memcpy(ga.d + p * K / 32, qa.d + ptok[p] * K / 32,
                           sizeof(float) * (size_t)(K / 32));
                    memcpy(ga.s + p * K / 16, qa.s + ptok[p] * K / 16,
                           sizeof(int32_t) * (size_t)(K / 16));
                }
            }
            for (int64_t p = 0; p < P && !err; p++)
                memcpy(xs + p * K * es, (const char *)h + ptok[p] * K * es, (size_t)(K * es));
            if (!err) err = mat_grouped(&L->eg, bf16, xs, &ga, gexp, start, G, gu, F2, nt);
            if (!err) {
                silu_mul(gu, s, bf16, P, Fe);
                qact_t da = {0};
                if (mat_has_quant(&L->ed)) err = qact_make(&da, s, bf16, Fe, P, Fe, nt);
                if (!err) err = mat_grouped(&L->ed, bf16, s, &da, gexp, start, G, y, E, nt);
                qact_free(&da);
            }
            for (int64_t p = 0; p < P && !err; p++) { /* combine, in pair order */
                float *o = routed + ptok[p] * E;
                const float wp = pw[p];
                if (bf16) {
                    const uint16_t *yp = (const uint16_t *)y + p * E;
                    for (int64_t e = 0; e < E; e++)
                        o[e] = __builtin_fmaf(bf16_to_f32(yp[e]), wp, o[e]);
                } else {
                    const float *yp = (const float *)y + p * E;
                    for (int64_t e = 0; e < E; e++) o[e] += yp[e] * wp;
                }
            }
            qact_free(&ga);
            free(xs), free(gu), free(s), free(y);
        }
    }
    if (!err && shared)
        err = swiglu(&L->gate_up, &L->down, bf16, h, T, shared, &qa, nt);
    qact_free(&qa);
    free(logits), free(sel), free(hf);
    return err;
}

/* mode bits: 1 attention, 2 FFN, 4 add attention into x (else write it to out), 8 add the FFN
 * into x (else write its partial sum to out). x: [T, E] float32 residual; out: [T, E]
 * float32; pool: this layer's latent pool (compute dtype). Returns 0 or a negative error. */
int fused_decode_layer(const layer_t *L, const step_t *S, float *x, float *out, void *pool,
                       int64_t mode) {
    const int bf16 = (int)L->bf16;
    const int64_t T = S->T, E = L->E, es = bf16 ? 2 : 4;
    if (T <= 0 || T > MAXT) return FERR_SHAPE;
    const double t_start = prof_on ? now_ns() : 0.0;
    prof_cur = prof_on && L->index >= 0 && L->index < PROF_LAYERS ? prof[L->index] : NULL;
    int err = 0;
    char *a = malloc((size_t)(T * E * es)), *h = malloc((size_t)(T * E * es));
    char *sh = malloc((size_t)(T * E * es));
    float *routed = malloc(sizeof(float) * (size_t)(T * E));
    if (!a || !h || !sh || !routed) err = FERR_NOMEM;
    if (!err && (mode & 1)) {
        err = attention(L, S, x, a, pool);
        float *dst = (mode & 4) ? x : out;
        for (int64_t i = 0; i < T * E && !err; i++)
            dst[i] = (mode & 4) ? x[i] + ld(a, bf16, i) : ld(a, bf16, i);
    }
    if (!err && (mode & 2)) {
        rms_norm(x, 0, E, L->ffn_norm, bf16, h, T, E, (float)L->eps);
        if (!L->moe) {
            err = swiglu(&L->gate_up, &L->down, bf16, h, T, a, NULL, (int)S->nthreads);
            for (int64_t i = 0; i < T * E && !err; i++)
                if (mode & 8) x[i] += ld(a, bf16, i);
                else out[i] = ld(a, bf16, i);
        } else {
            const int hs = (int)L->has_shared;
            err = moe(L, S, h, routed, hs ? sh : NULL);
            for (int64_t i = 0; i < T * E && !err; i++) {
                const float s = hs ? ld(sh, bf16, i) : 0.0f;
                if (!(mode & 8)) out[i] = routed[i] + s;
                else if (L->complete) x[i] = (x[i] + routed[i]) + s;
                else x[i] += routed[i] + s;
            }
        }
    }
    free(a), free(h), free(sh), free(routed);
    if (prof_cur) prof_cur[0] += now_ns() - t_start;
    prof_cur = NULL;
    return err;
}

/* The final norm and the LM head of a decode step. */
typedef struct {
    int64_t E, bf16;
    double eps;
    const void *norm;
    fmat_t w;
} head_t;

/* logits [R, N] float32 = head(norm(x[rows[r]])) for R (<= 16) rows of x [*, E]. */
int fused_decode_head(const head_t *Hd, const float *x, const int64_t *rows, int64_t R,
                      float *logits, int64_t nthreads) {
    const int bf16 = (int)Hd->bf16;
    const int64_t E = Hd->E, N = Hd->w.N, es = bf16 ? 2 : 4;
    if (R <= 0 || R > MAXT) return FERR_SHAPE;
    char *h = malloc((size_t)(R * E * es)), *y = bf16 ? malloc((size_t)(R * N * es)) : NULL;
    float *xs = malloc(sizeof(float) * (size_t)(R * E));
    int err = h && xs && (y || !bf16) ? 0 : FERR_NOMEM;
    for (int64_t r = 0; r < R && !err; r++) memcpy(xs + r * E, x + rows[r] * E, 4 * (size_t)E);
    const double t_start = prof_on ? now_ns() : 0.0;
    prof_cur = prof_on ? prof[PROF_LAYERS - 1] : NULL; /* the last row: the head */
    if (!err) {
        rms_norm(xs, 0, E, Hd->norm, bf16, h, R, E, (float)Hd->eps);
        err = mat_mul(&Hd->w, bf16, h, E, R, bf16 ? (void *)y : (void *)logits, N, NULL,
                      (int)nthreads);
    }
    if (!err && bf16)
        for (int64_t i = 0; i < R * N; i++) logits[i] = bf16_to_f32(((uint16_t *)y)[i]);
    if (prof_cur) prof_cur[0] += now_ns() - t_start;
    prof_cur = NULL;
    free(h), free(y), free(xs);
    return err;
}
