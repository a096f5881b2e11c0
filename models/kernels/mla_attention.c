/* Absorbed MLA attention over the paged latent cache, for decode and short prefill chunks.
 *
 * Every head of a query row attends over the same latent rows (c_kv | k_pe, D = C + R values
 * per token): scores are q_h . kv_l (the query already carries k_b), the output is the
 * softmax-weighted sum of the first C values of each kv_l (v_b is applied afterwards). Rows
 * are read straight from the pool through the sequence's slot list, so nothing is gathered,
 * and one call covers every row of a batch: no per-sequence work in Python.
 *
 * Precision: bf16 inputs, float32 scores (dot products with AVX512-BF16), float32 softmax
 * and sums, bf16 output (rounded to nearest even).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernel_util.h"

#define HB 4 /* heads per work item: one pass over the keys serves four heads */

/* One work item: heads h0 .. h0+nh-1 of query row t. s: scratch of HB * L floats. */
static void item(const uint16_t *q, const uint16_t *kv, const int64_t *slots, int64_t L,
                 uint16_t *out, int64_t nh, int64_t D, int64_t C, float scale, float *s) {
    const int64_t dfull = D & ~(int64_t)31;
    /* scores: each key row is loaded once for all nh heads */
    for (int64_t l = 0; l < L; l++) {
        const uint16_t *row = kv + slots[l] * D;
        __m512 acc[HB];
        for (int64_t h = 0; h < nh; h++) acc[h] = _mm512_setzero_ps();
        for (int64_t d = 0; d < dfull; d += 32) {
            __m512bh k = (__m512bh)_mm512_loadu_si512(row + d);
            for (int64_t h = 0; h < nh; h++)
                acc[h] = _mm512_dpbf16_ps(acc[h], (__m512bh)_mm512_loadu_si512(q + h * D + d), k);
        }
        for (int64_t h = 0; h < nh; h++) {
            float v = _mm512_reduce_add_ps(acc[h]);
            for (int64_t d = dfull; d < D; d++) { /* D not a multiple of 32 */
                uint32_t a = (uint32_t)q[h * D + d] << 16, b = (uint32_t)row[d] << 16;
                float fa, fb;
                __builtin_memcpy(&fa, &a, 4);
                __builtin_memcpy(&fb, &b, 4);
                v += fa * fb;
            }
            s[h * L + l] = v * scale;
        }
    }
    /* softmax per head, in place */
    for (int64_t h = 0; h < nh; h++) {
        float *sh = s + h * L, mx = -INFINITY, sum = 0.0f;
        for (int64_t l = 0; l < L; l++) mx = sh[l] > mx ? sh[l] : mx;
        for (int64_t l = 0; l < L; l++) sum += (sh[l] = expf(sh[l] - mx));
        const float inv = 1.0f / sum;
        for (int64_t l = 0; l < L; l++) sh[l] *= inv;
    }
    /* out[h][c] = sum_l p[h][l] * kv_l[c], 64 columns at a time (HB x 4 accumulators) */
    for (int64_t c0 = 0; c0 < C; c0 += 64) {
        const int64_t nc = (C - c0) < 64 ? (C - c0) : 64;
        if (nc == 64) {
            __m512 acc[HB][4];
            for (int64_t h = 0; h < nh; h++)
                for (int j = 0; j < 4; j++) acc[h][j] = _mm512_setzero_ps();
            for (int64_t l = 0; l < L; l++) {
                const uint16_t *row = kv + slots[l] * D + c0;
                __m512 v0 = bf16x16_to_f32(row), v1 = bf16x16_to_f32(row + 16);
                __m512 v2 = bf16x16_to_f32(row + 32), v3 = bf16x16_to_f32(row + 48);
                for (int64_t h = 0; h < nh; h++) {
                    __m512 p = _mm512_set1_ps(s[h * L + l]);
                    acc[h][0] = _mm512_fmadd_ps(p, v0, acc[h][0]);
                    acc[h][1] = _mm512_fmadd_ps(p, v1, acc[h][1]);
                    acc[h][2] = _mm512_fmadd_ps(p, v2, acc[h][2]);
                    acc[h][3] = _mm512_fmadd_ps(p, v3, acc[h][3]);
                }
            }
            for (int64_t h = 0; h < nh; h++) {
                float tmp[64];
                for (int j = 0; j < 4; j++) _mm512_storeu_ps(tmp + 16 * j, acc[h][j]);
                for (int j = 0; j < 64; j++) out[h * C + c0 + j] = f32_to_bf16(tmp[j]);
            }
        } else { /* a C that is not a multiple of 64 (test models): plain loops */
            for (int64_t h = 0; h < nh; h++)
                for (int64_t c = c0; c < C; c++) {
                    float a = 0.0f;
                    for (int64_t l = 0; l < L; l++) {
                        uint32_t b = (uint32_t)kv[slots[l] * D + c] << 16;
                        float f;
                        __builtin_memcpy(&f, &b, 4);
                        a += s[h * L + l] * f;
                    }
                    out[h * C + c] = f32_to_bf16(a);
                }
        }
    }
}

/* q: [R, H, D] bf16, the R query rows (k_b already folded in, then the roped part);
 * kv: the layer's pool [S, D] bf16; slots: concatenated context slot lists;
 * row_start[r], row_len[r]: row r attends to slots[row_start[r] .. + row_len[r]] (its
 * sequence's context up to and including itself); out: [R, H, C] bf16.
 * Returns 0, or -1 when a thread's scratch memory could not be allocated. */
int mla_attention_bf16(const uint16_t *q, const uint16_t *kv, const int64_t *slots,
                       const int64_t *row_start, const int64_t *row_len, uint16_t *out,
                       int64_t R, int64_t H, int64_t D, int64_t C, float scale, int nthreads) {
    int failed = 0;
    const int64_t groups = (H + HB - 1) / HB;
    int64_t max_len = 1;
    for (int64_t r = 0; r < R; r++) max_len = row_len[r] > max_len ? row_len[r] : max_len;
    #pragma omp parallel num_threads(nthreads)
    {
        float *s = (float *)malloc(sizeof(float) * HB * max_len);
        if (!s) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < R * groups; it++) {
            const int64_t r = it / groups, h0 = (it % groups) * HB;
            const int64_t nh = H - h0 < HB ? H - h0 : HB;
            if (s && row_len[r] > 0)
                item(q + (r * H + h0) * D, kv, slots + row_start[r], row_len[r],
                     out + (r * H + h0) * C, nh, D, C, scale, s);
        }
        free(s);
    }
    return failed ? -1 : 0; /* -1: scratch memory could not be allocated (out untouched) */
}
