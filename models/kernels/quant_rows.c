/* Conversions between float rows and quantized rows: activations to int8 per 32 values
 * (quantize_rows_q8, the input of every quantized product) and GGUF weight rows back to
 * float32 / bf16 (quant_dequant_rows: embeddings, prefill tiles). */
#include "quant_blocks.h"

/* ---- activations ---- */

/* X [M, K] (row stride ldx; float32, or bf16 when x_is_bf16) -> xq int8 [M, K], xd float
 * [M, K/32] (xq * xd approximates X), xsum int32 [M, K/16] (sums of 16 consecutive xq). */
int quantize_rows_q8(const void *X, int x_is_bf16, int64_t ldx, int64_t M, int64_t K,
                     int8_t *xq, float *xd, int32_t *xsum, int nthreads) {
    if (M < 0 || K % 32 != 0) return QERR_SHAPE;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K > (1 << 18))
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < K / 32; g++) {
            __m512 v[2];
            for (int h = 0; h < 2; h++) {
                const int64_t o = m * ldx + 32 * g + 16 * h;
                v[h] = x_is_bf16 ? bf16x16_to_f32((const uint16_t *)X + o)
                                 : _mm512_loadu_ps((const float *)X + o);
            }
            const float amax = _mm512_reduce_max_ps(
                _mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            /* below ~1e-30 (or NaN) the row block is taken as zero: 127 / amax could overflow */
            const int zero = !(amax >= 1e-30f);
            const float d = zero ? 0.0f : amax / 127.0f, id = zero ? 0.0f : 127.0f / amax;
            xd[m * (K / 32) + g] = d;
            for (int h = 0; h < 2; h++) {
                /* default MXCSR rounding: to nearest even; |x * id| <= 127 */
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[h], _mm512_set1_ps(id)));
                _mm_storeu_si128((__m128i *)(xq + m * K + 32 * g + 16 * h), _mm512_cvtepi32_epi8(q));
                xsum[m * (K / 16) + 2 * g + h] = _mm512_reduce_add_epi32(q);
            }
        }
    }
    return 0;
}

/* ---- dequantization to float32 / bf16, natural order ---- */

static inline void store16(void *out, int64_t o, int bf16, __m512 v) {
    if (bf16) /* vcvtneps2bf16 rounds to nearest even, as f32_to_bf16 */
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + o), (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_storeu_ps((float *)out + o, v);
}

/* 16 unsigned bytes -> s * u + mn (one rounding: every product here is exact in float32) */
static inline __m512 affine16(__m128i u, __mmask16 plus16, float s, float mn) {
    __m512i v = _mm512_cvtepu8_epi32(u);
    v = _mm512_mask_add_epi32(v, plus16, v, _mm512_set1_epi32(16));
    return _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(v), _mm512_set1_ps(mn));
}

static void dequant_row(int qtype, const uint8_t *row, int64_t K, void *out, int64_t o,
                        int bf16) {
    const __m128i m4 = _mm_set1_epi8(0x0F);
    if (qtype == Q8_0) {
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *p = row + 34 * b;
            const __m512 d = _mm512_set1_ps(fp16_at(p));
            for (int h = 0; h < 2; h++) {
                const __m128i q = _mm_loadu_si128((const __m128i *)(p + 2 + 16 * h));
                store16(out, o + 32 * b + 16 * h, bf16,
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
            }
        }
    } else if (qtype == Q4_0 || qtype == Q5_0 || qtype == Q5_1) {
        const int bs = qtype == Q4_0 ? 18 : qtype == Q5_0 ? 22 : 24;
        for (int64_t b = 0; b < K / 32; b++) {
            const uint8_t *p = row + bs * b;
            const float d = fp16_at(p);
            const float mn = qtype == Q4_0 ? -8 * d : qtype == Q5_0 ? -16 * d : fp16_at(p + 2);
            const uint32_t qh = qtype == Q4_0 ? 0 : u32_at(p + bs - 20);
            const __m128i q = _mm_loadu_si128((const __m128i *)(p + bs - 16));
            store16(out, o + 32 * b, bf16, affine16(_mm_and_si128(q, m4), qh & 0xFFFF, d, mn));
            store16(out, o + 32 * b + 16, bf16,
                    affine16(_mm_and_si128(_mm_srli_epi16(q, 4), m4), qh >> 16, d, mn));
        }
    } else if (qtype == Q4_K || qtype == Q5_K) {
        const int bs = qtype == Q4_K ? 144 : 176, qo = qtype == Q4_K ? 16 : 48;
        for (int64_t b = 0; b < K / 256; b++) {
            const uint8_t *p = row + bs * b;
            const float d = fp16_at(p), dmin = fp16_at(p + 2);
            uint64_t sc, mn;
            k_scales(p + 4, &sc, &mn);
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(p + 16));
            for (int j = 0; j < 8; j++) {
                const float s = d * (float)((sc >> 8 * j) & 0xFF);
                const float m = -dmin * (float)((mn >> 8 * j) & 0xFF);
                const uint32_t hb = qtype == Q5_K
                    ? _mm256_test_epi8_mask(qh, _mm256_set1_epi8((char)(1 << j))) : 0;
                for (int h = 0; h < 2; h++) {
                    __m128i q = _mm_loadu_si128((const __m128i *)(p + qo + 32 * (j / 2) + 16 * h));
                    if (j % 2) q = _mm_srli_epi16(q, 4);
                    store16(out, o + 256 * b + 32 * j + 16 * h, bf16,
                            affine16(_mm_and_si128(q, m4), (__mmask16)(hb >> 16 * h), s, m));
                }
            }
        }
    } else { /* Q6_K */
        for (int64_t b = 0; b < K / 256; b++) {
            const uint8_t *p = row + 210 * b;
            const float d = fp16_at(p + 208);
            for (int g = 0; g < 16; g++) {
                const int h = g / 8, kk = (g % 8) / 2, l0 = 16 * (g % 2);
                __m128i q = _mm_loadu_si128((const __m128i *)(p + 64 * h + 32 * (kk % 2) + l0));
                if (kk / 2) q = _mm_srli_epi16(q, 4);
                __m128i hq = _mm_loadu_si128((const __m128i *)(p + 128 + 32 * h + l0));
                hq = _mm_and_si128(_mm_srl_epi16(hq, _mm_cvtsi32_si128(2 * kk)), _mm_set1_epi8(3));
                const __m128i u = _mm_or_si128(_mm_and_si128(q, m4), _mm_slli_epi16(hq, 4));
                const float s = d * (float)(int8_t)p[192 + g];
                store16(out, o + 256 * b + 16 * g, bf16, affine16(u, 0, s, -32 * s));
            }
        }
    }
}

/* out[i, :] = row rows[i] (i if rows is NULL) of W, dequantized: float32, or bf16 when
 * out_is_bf16; out is [nrows, K] contiguous. */
int quant_dequant_rows(int qtype, const uint8_t *W, int64_t row_bytes, const int64_t *rows,
                       int64_t nrows, int64_t K, void *out, int out_is_bf16, int nthreads) {
    if (!supported(qtype)) return QERR_TYPE;
    if (K <= 0 || K % block_elems(qtype) != 0 || nrows < 0) return QERR_SHAPE;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (nrows * K > (1 << 15))
    for (int64_t i = 0; i < nrows; i++)
        dequant_row(qtype, W + (rows ? rows[i] : i) * row_bytes, K, out, i * K, out_is_bf16);
    return 0;
}
