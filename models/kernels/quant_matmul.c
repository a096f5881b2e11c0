/* Products straight from quantized GGUF weight blocks (Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K,
 * Q6_K), for decode-sized batches, plus row dequantization (embeddings, prefill tiles).
 *
 * Numerics. Activations are quantized once per call to int8 per 32-element block
 * (d = amax/127 in float32, round to nearest even), with integer sums per 16 elements. Every
 * weight type is written per group (32 elements; 16 for Q6_K) as value = s * u + mn with an
 * unsigned byte u, so a group's dot product is s * d_x * sum(u * q_x) + mn * d_x * sum(q_x):
 * the first sum is AVX512-VNNI vpdpbusd (u8 x s8 -> int32, exact), the second uses the
 * activation sums. Types with mn = -offset * s (Q4_0, Q5_0, Q8_0, Q6_K) fold it into the
 * integer sum (the accumulator starts at -offset * sum(q_x)); the rest (Q5_1, Q4_K, Q5_K) add
 * it in float32. Scales multiply and groups add up in float32. The only error beyond float32
 * rounding is the 8-bit activation quantization (llama.cpp quantizes activations too).
 *
 * Layout ("lanes = groups"). Scales change every group, so a naive vpdpbusd over 64
 * consecutive weights leaves 8 int32 lanes per group, and each lane then needs its own
 * convert, scale and add for every activation row. Instead each chunk of 16 groups is
 * transposed so that int32 lane l of every register holds 4 elements of one group: 8 (4 for
 * Q6_K) vpdpbusd leave one finished group sum per lane, and the float work is one convert,
 * one multiply and one FMA per 16 groups and activation row. Each type's unpack first builds
 * a "P form" (4 groups per register, see transpose4) with as few lane-crossing shuffles as
 * its block layout allows, which fixes the order of groups over lanes (lane_group); the
 * activations are laid out the same way once per call (act_layout). One or two activation
 * rows take each unpacked chunk straight from registers (rows_fused); more rows unpack each
 * weight row once into a small per-thread buffer and work in register tiles (rows_buffered).
 *
 * Weight row n starts at W + n * row_bytes (row_bytes may exceed the packed row: column
 * slices of a wider tensor). Entry points return 0, or QERR_* (unknown type, bad shape,
 * allocation failure) without touching the output.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_util.h"

#define MAXM 16
#define TILE_M 4 /* activation rows per register tile (dot_tile) */
#define FUSED_M 8 /* up to this many rows, no row buffer (rows_fused): measured faster than the
                   * tiles up to 8 rows, slower from 12 (registers run out) */
#define PREFETCH_ROWS 4 /* weight rows ahead that rows_fused prefetches */
#define QERR_TYPE (-1)
#define QERR_SHAPE (-2)
#define QERR_NOMEM (-3)

enum { Q4_0 = 2, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

/* Per-type constants, as functions of the type so that they fold where qtype is a constant */
static inline int block_elems(int t) { return t == Q4_K || t == Q5_K || t == Q6_K ? 256 : 32; }
static inline int block_bytes(int t) {
    switch (t) {
    case Q4_0: return 18;
    case Q5_0: return 22;
    case Q5_1: return 24;
    case Q8_0: return 34;
    case Q4_K: return 144;
    case Q5_K: return 176;
    default: return 210;
    }
}
/* 64-byte registers per transposed chunk: 16 groups of 32 (512 elements) or of 16 (Q6_K) */
static inline int chunk_regs_of(int t) { return t == Q6_K ? 4 : 8; }
static inline int chunk_elems(int t) { return 64 * chunk_regs_of(t); }
/* u = q + offset, value = s * (u - offset); 0: a separate min term (Q5_1, Q4_K, Q5_K) */
static inline int offset_of(int t) {
    return t == Q4_0 ? 8 : t == Q5_0 ? 16 : t == Q8_0 ? 128 : t == Q6_K ? 32 : 0;
}
static inline int supported(int t) {
    return t == Q4_0 || t == Q5_0 || t == Q5_1 || t == Q8_0 || t == Q4_K || t == Q5_K || t == Q6_K;
}

static inline float fp16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline uint32_t u32_at(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline __m512i load4x128(const uint8_t *a, const uint8_t *b, const uint8_t *c,
                                const uint8_t *d) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)a));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)b), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)c), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)d), 3);
}

static inline __m512i nib_lo(__m512i q) { return _mm512_and_si512(q, _mm512_set1_epi8(0x0F)); }
static inline __m512i nib_hi(__m512i q) {
    return _mm512_and_si512(_mm512_srli_epi16(q, 4), _mm512_set1_epi8(0x0F));
}

/* fp16 d of 16 blocks at stride bs (lane l = block l) -> float32: scalar loads into a small
 * buffer and one vector convert (a vpgatherdd here cost ~16 cycles per chunk, measured) */
static inline __m512 block_scales16(const uint8_t *b, int bs, int off) {
    uint16_t h[16];
    for (int l = 0; l < 16; l++) memcpy(&h[l], b + l * bs + off, 2);
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
}

/* Input "P form": 128-bit chunk c of P[i] (i < 4) holds 4 dwords of one group, say G(c, i).
 * Output: lane 4c + i of register k holds dword k of G(c, i); lane_group(4c + i) = G(c, i). */
static inline __attribute__((always_inline)) void transpose4(const __m512i *P, __m512i *R) {
    const __m512i t0 = _mm512_unpacklo_epi32(P[0], P[1]), t1 = _mm512_unpackhi_epi32(P[0], P[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(P[2], P[3]), t3 = _mm512_unpackhi_epi32(P[2], P[3]);
    R[0] = _mm512_unpacklo_epi64(t0, t2);
    R[1] = _mm512_unpackhi_epi64(t0, t2);
    R[2] = _mm512_unpacklo_epi64(t1, t3);
    R[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* Q5_0/Q5_1 fifth bits (qh at offset off of 16 blocks at stride bs): adds 16 to byte j of
 * chunk c of P[i] (element j, or 16 + j for P[4 + i], of block 4c + i) where bit j (16 + j)
 * is set. The byte masks are assembled in general registers: integer ALUs are otherwise idle
 * here, the vector pipes are not. */
static inline __attribute__((always_inline)) void add_qh_32(__m512i *P, const uint8_t *b,
                                                            int bs, int off) {
    const __m512i sixteen = _mm512_set1_epi8(16);
    for (int i = 0; i < 4; i++) {
        uint64_t lo = 0, hi = 0;
        for (int c = 0; c < 4; c++) {
            const uint64_t q = u32_at(b + (4 * c + i) * bs + off);
            lo |= (q & 0xFFFFu) << 16 * c;
            hi |= (q >> 16) << 16 * c;
        }
        P[i] = _mm512_mask_add_epi8(P[i], lo, P[i], sixteen);
        P[4 + i] = _mm512_mask_add_epi8(P[4 + i], hi, P[4 + i], sixteen);
    }
}

/* ---- chunks of a weight row -> transposed u8 registers, per-lane scale ws, min term wm ---- */

/* 16 blocks of a 32-element type starting at b (a zero-padded copy for a row's last chunk).
 * Chunk c of P[i] / P[4 + i]: elements 0-15 / 16-31 of block 4c + i, so lane l = block l. The
 * 18- to 34-byte blocks are not 16-byte aligned: each chunk is its own 128-bit load. */
static inline __attribute__((always_inline)) void chunk32(int qtype, const uint8_t *b,
                                                          __m512i *R, __m512 *ws, __m512 *wm) {
    __m512i P[8];
    if (qtype == Q8_0) {
        const __m512i flip = _mm512_set1_epi8((char)0x80); /* q + 128 as an unsigned byte */
        for (int i = 0; i < 4; i++) {
            P[i] = _mm512_xor_si512(flip, load4x128(b + 34 * i + 2, b + 34 * (4 + i) + 2,
                                                    b + 34 * (8 + i) + 2, b + 34 * (12 + i) + 2));
            P[4 + i] = _mm512_xor_si512(flip, load4x128(b + 34 * i + 18, b + 34 * (4 + i) + 18,
                                                        b + 34 * (8 + i) + 18,
                                                        b + 34 * (12 + i) + 18));
        }
        *ws = block_scales16(b, 34, 0);
    } else {
        /* nibble types: byte j of qs holds element j (low) and j + 16 (high) */
        const int bs = qtype == Q4_0 ? 18 : qtype == Q5_0 ? 22 : 24;
        const int qs = bs - 16;
        for (int i = 0; i < 4; i++) {
            const __m512i q = load4x128(b + bs * i + qs, b + bs * (4 + i) + qs,
                                        b + bs * (8 + i) + qs, b + bs * (12 + i) + qs);
            P[i] = nib_lo(q);
            P[4 + i] = nib_hi(q);
        }
        *ws = block_scales16(b, bs, 0);
        if (qtype == Q5_1) *wm = block_scales16(b, bs, 2);
        if (qtype != Q4_0) add_qh_32(P, b, bs, bs - 20);
    }
    transpose4(P, R);
    transpose4(P + 4, R + 4);
}

/* 8 six-bit scales and mins of a Q4_K/Q5_K super-block's 12-byte field, as bytes */
static inline void k_scales(const uint8_t *s, uint64_t *sc, uint64_t *mn) {
    const uint32_t s0 = u32_at(s), s1 = u32_at(s + 4), s2 = u32_at(s + 8);
    const uint32_t sc_lo = s0 & 0x3F3F3F3Fu, m_lo = s1 & 0x3F3F3F3Fu;
    const uint32_t sc_hi = (s2 & 0x0F0F0F0Fu) | ((s0 >> 2) & 0x30303030u);
    const uint32_t m_hi = ((s2 >> 4) & 0x0F0F0F0Fu) | ((s1 >> 2) & 0x30303030u);
    *sc = sc_lo | (uint64_t)sc_hi << 32;
    *mn = m_lo | (uint64_t)m_hi << 32;
}

/* Two super-blocks of Q4_K/Q5_K (s0, s1 = s0 + block bytes). Sub-block j's quants are the
 * low (even j) or high (odd j) nibbles of bytes 32 (j / 2) .. + 31; Q5_K's fifth bit of its
 * element e is bit j of qh[e]. Whole 64-byte loads and one 128-bit lane shuffle per pair put
 * the two halves of each sub-block in the same chunk of two registers (P form) in 4 shuffles
 * instead of 12 inserts, at the price of a lane order (k_lane_group) other than natural. */
static inline __attribute__((always_inline)) void chunk_k(int qtype, const uint8_t *s0,
                                                          __m512i *R, __m512 *ws, __m512 *wm) {
    const int bs = qtype == Q4_K ? 144 : 176, qo = qtype == Q4_K ? 16 : 48;
    const uint8_t *s1 = s0 + bs, *q0 = s0 + qo, *q1 = s1 + qo;
    __m512i P[8];
    for (int h = 0; h < 2; h++) {
        const __m512i z0 = _mm512_loadu_si512(q0 + 64 * h), z1 = _mm512_loadu_si512(q1 + 64 * h);
        /* chunk c of a (b): first (second) 16 bytes of 32-byte group 2h + c % 2 of s_(c / 2) */
        const __m512i a = _mm512_shuffle_i32x4(z0, z1, _MM_SHUFFLE(2, 0, 2, 0));
        const __m512i b = _mm512_shuffle_i32x4(z0, z1, _MM_SHUFFLE(3, 1, 3, 1));
        P[2 * h] = nib_lo(a);
        P[2 * h + 1] = nib_hi(a);
        P[4 + 2 * h] = nib_lo(b);
        P[5 + 2 * h] = nib_hi(b);
    }
    if (qtype == Q5_K) {
        const uint8_t *h0 = s0 + 16, *h1 = s1 + 16;
        for (int half = 0; half < 2; half++) {
            /* qh bytes of the half for s0 in chunks 0, 1 and s1 in chunks 2, 3 */
            const __m512i H = _mm512_inserti64x4(
                _mm512_castsi256_si512(_mm256_broadcastsi128_si256(
                    _mm_loadu_si128((const __m128i *)(h0 + 16 * half)))),
                _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(h1 + 16 * half))),
                1);
            for (int i = 0; i < 4; i++) {
                /* P[i] chunk c holds sub-block 4 (i / 2) + 2 (c % 2) + i % 2 */
                const int j = 4 * (i / 2) + i % 2;
                const __m512i pat = _mm512_mask_blend_epi64(
                    0xCC, _mm512_set1_epi8((char)(1 << j)), _mm512_set1_epi8((char)(1 << (j + 2))));
                __m512i *p = &P[4 * half + i];
                *p = _mm512_mask_add_epi8(*p, _mm512_test_epi8_mask(H, pat), *p,
                                          _mm512_set1_epi8(16));
            }
        }
    }
    transpose4(P, R);
    transpose4(P + 4, R + 4);
    uint64_t sc0, m0, sc1, m1;
    k_scales(s0 + 4, &sc0, &m0);
    k_scales(s1 + 4, &sc1, &m1);
    const __m128i order = _mm_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
    const __m128i sc = _mm_shuffle_epi8(_mm_set_epi64x((int64_t)sc1, (int64_t)sc0), order);
    const __m128i mn = _mm_shuffle_epi8(_mm_set_epi64x((int64_t)m1, (int64_t)m0), order);
    /* lanes 8-15 are super-block s1 */
    const __m512 d = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(fp16_at(s0)),
                                          _mm512_set1_ps(fp16_at(s1)));
    const __m512 dmin = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(-fp16_at(s0 + 2)),
                                             _mm512_set1_ps(-fp16_at(s1 + 2)));
    *ws = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
    *wm = _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
}

/* One Q6_K super-block, 16 groups of 16. 64 bytes of ql give 4 groups in their low nibbles
 * (chunk c: elements 16 c ..) and 4 in their high ones (64 + 16 c ..); the 2-bit parts come
 * from qh[32 h + l] >> 2 kk for element 128 h + 32 kk + l (see the gguf dequantizer). Lane
 * order: q6k_lane_group. */
static inline __attribute__((always_inline)) void chunk_q6k(const uint8_t *b, __m512i *R,
                                                            __m512 *ws) {
    const uint8_t *ql = b, *qh = b + 128;
    /* per 128-bit chunk c: shift 2 (c / 2) for the low-nibble groups, 4 + that for the high */
    const __m512i s_lo = _mm512_mask_blend_epi64(0xF0, _mm512_setzero_si512(),
                                                 _mm512_set1_epi16(2));
    const __m512i s_hi = _mm512_add_epi16(s_lo, _mm512_set1_epi16(4));
    const __m512i three = _mm512_set1_epi8(3);
    __m512i P[4];
    for (int h = 0; h < 2; h++) {
        const __m512i z = _mm512_loadu_si512(ql + 64 * h);
        const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qh + 32 * h)));
        const __m512i hl = _mm512_and_si512(_mm512_srlv_epi16(hb, s_lo), three);
        const __m512i hh = _mm512_and_si512(_mm512_srlv_epi16(hb, s_hi), three);
        P[2 * h] = _mm512_or_si512(nib_lo(z), _mm512_slli_epi16(hl, 4));
        P[2 * h + 1] = _mm512_or_si512(nib_hi(z), _mm512_slli_epi16(hh, 4));
    }
    transpose4(P, R);
    const __m128i order = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m128i sc = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b + 192)), order);
    *ws = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)),
                        _mm512_set1_ps(fp16_at(b + 208)));
}

/* The group (within its chunk of 16) that lane l of a transposed chunk holds: lane 4c + i
 * comes from chunk c of P[i]. */
static inline int lane_group(int t, int l) {
    const int c = l / 4, i = l % 4;
    if (t == Q6_K) return 4 * i + c;
    if (t == Q4_K || t == Q5_K) return 8 * (c / 2) + 4 * (i / 2) + 2 * (c % 2) + i % 2;
    return l;
}

/* Chunk t of a row (nb blocks), transposed, in registers. A row's last partial chunk (K not a
 * multiple of 512) is read through a zero-padded copy: zero scales make missing groups add 0. */
static inline __attribute__((always_inline)) void chunk_regs(
        const int T, const uint8_t *row, int64_t nb, int64_t t, __m512i *R, __m512 *ws,
        __m512 *wm) {
    const int64_t per = chunk_elems(T) / block_elems(T); /* blocks per chunk */
    const uint8_t *b = row + t * per * block_bytes(T);
    uint8_t pad[16 * 34] __attribute__((aligned(64)));
    if (T != Q6_K && (t + 1) * per > nb) { /* Q6_K: K is always a multiple of its chunk */
        memset(pad, 0, sizeof pad);
        memcpy(pad, b, (size_t)((nb - t * per) * block_bytes(T)));
        b = pad;
    }
    *wm = _mm512_setzero_ps();
    if (T == Q6_K)
        chunk_q6k(b, R, ws);
    else if (T == Q4_K || T == Q5_K)
        chunk_k(T, b, R, ws, wm);
    else
        chunk32(T, b, R, ws, wm);
}

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

/* Activation rows in the weights' transposed layout, per row: xt [nch * chunk] int8, then per
 * lane (16 per chunk) xv = block scale, xi = -offset * sum (int32 accumulator start),
 * xs = scale * sum (for the separate min term). */
typedef struct {
    int8_t *xt;
    float *xv, *xs;
    int32_t *xi;
    int64_t nch, chunk;
} act_t;

static int act_alloc(act_t *a, int64_t R, int64_t nch, int64_t chunk) {
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

static void act_layout(int qtype, const int8_t *xq, const float *xd, const int32_t *xsum,
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

/* ---- the product of weight rows with activation rows ---- */

/* one chunk of weight registers w against activation row r: acc += its 16 group sums */
static inline __attribute__((always_inline)) __m512 dot_chunk(
        const int REGS, const int ASYM, const __m512i *w, __m512 s, __m512 mn, const act_t *a,
        int64_t r, int64_t c, __m512 acc) {
    const int64_t lane = r * a->nch * 16 + 16 * c;
    const int8_t *x = a->xt + (r * a->nch + c) * 64 * REGS;
    /* two dependency chains: one row's dot is latency-bound otherwise */
    __m512i i0 = ASYM ? _mm512_setzero_si512() : _mm512_load_si512(a->xi + lane);
    __m512i i1 = _mm512_setzero_si512();
    for (int k = 0; k < REGS / 2; k++)
        i0 = _mm512_dpbusd_epi32(i0, w[k], _mm512_load_si512(x + 64 * k));
    for (int k = REGS / 2; k < REGS; k++)
        i1 = _mm512_dpbusd_epi32(i1, w[k], _mm512_load_si512(x + 64 * k));
    const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(i0, i1));
    acc = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_load_ps(a->xv + lane)), acc);
    if (ASYM) acc = _mm512_fmadd_ps(mn, _mm512_load_ps(a->xs + lane), acc);
    return acc;
}

static inline void store_out(void *Y, int64_t ldy, int y_is_bf16, int64_t n, const float *out,
                             int64_t M) {
    for (int64_t m = 0; m < M; m++) {
        if (y_is_bf16)
            ((uint16_t *)Y)[m * ldy + n] = f32_to_bf16(out[m]);
        else
            ((float *)Y)[m * ldy + n] = out[m];
    }
}

/* Up to 8 activation rows: each chunk goes from the weight bytes through registers straight
 * into the dot products of every row (their accumulators stay in registers), no round trip
 * through a row buffer. */
static inline __attribute__((always_inline)) void rows_fused(
        const int T, const int MF, const uint8_t *W, int64_t row_bytes, const act_t *a,
        int64_t r0, int64_t K, int64_t n0, int64_t n1, void *Y, int64_t ldy, int y_is_bf16) {
    const int REGS = chunk_regs_of(T), ASYM = offset_of(T) == 0;
    const int64_t rb = K / block_elems(T) * block_bytes(T); /* packed bytes of one row */
    /* the first rows, before their chunks are needed: every call (and every grouped work
     * item, often another expert) starts cold in DRAM, and the per-chunk prefetch below
     * only reaches PREFETCH_ROWS ahead */
    for (int64_t n = n0; n < n0 + PREFETCH_ROWS && n < n1; n++)
        for (int64_t o = 0; o < rb; o += 64)
            _mm_prefetch((const char *)(W + n * row_bytes + o), _MM_HINT_T2);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = W + n * row_bytes;
        __m512 acc[FUSED_M];
        for (int m = 0; m < MF; m++) acc[m] = _mm512_setzero_ps();
        const int64_t cb = chunk_elems(T) / block_elems(T) * block_bytes(T); /* chunk bytes */
        for (int64_t c = 0; c < a->nch; c++) {
            __m512i w[8];
            __m512 s, mn;
            /* The same chunk PREFETCH_ROWS rows ahead, into L2: from DRAM with 2 threads this
             * took 8 rows from 11-14 to 15-25 GB/s and 1 row from ~30 to ~35 GB/s (Q4_K,
             * Q6_K; Q8_0 1 row is at the bandwidth either way; into L1 it cost Q8_0 a third) */
            if (n + PREFETCH_ROWS < n1)
                for (int64_t o = 0; o < cb; o += 64)
                    _mm_prefetch((const char *)(row + PREFETCH_ROWS * row_bytes + c * cb + o),
                                 _MM_HINT_T2);
            chunk_regs(T, row, K / block_elems(T), c, w, &s, &mn);
            for (int m = 0; m < MF; m++)
                acc[m] = dot_chunk(REGS, ASYM, w, s, mn, a, r0 + m, c, acc[m]);
        }
        float out[FUSED_M];
        for (int m = 0; m < MF; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
        store_out(Y, ldy, y_is_bf16, n, out, MF);
    }
}

/* A register tile: NB (<= 2) weight rows already unpacked into the row buffer against MB (<= 4)
 * activation rows. Every weight and activation register loaded feeds NB x MB dpbusd, so
 * loads (not the arithmetic) stop being the limit; the 2 x 4 tile's 8 int32 and 8 float32
 * accumulators and its operands fit in the 32 vector registers. */
static inline __attribute__((always_inline)) void dot_tile(
        const int NB, const int MB, const int REGS, const int ASYM, const uint8_t *buf,
        int64_t row_stride, const act_t *a, int64_t r0, float out[2][TILE_M]) {
    const int64_t nch = a->nch;
    __m512 acc[2][TILE_M];
    for (int j = 0; j < NB; j++)
        for (int m = 0; m < MB; m++) acc[j][m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nch; c++) {
        __m512i ia[2][TILE_M];
        for (int m = 0; m < MB; m++) {
            const __m512i init = ASYM ? _mm512_setzero_si512()
                                      : _mm512_load_si512(a->xi + (r0 + m) * nch * 16 + 16 * c);
            for (int j = 0; j < NB; j++) ia[j][m] = init;
        }
        for (int k = 0; k < REGS; k++) {
            __m512i w[2];
            for (int j = 0; j < NB; j++)
                w[j] = _mm512_load_si512(buf + j * row_stride + (c * REGS + k) * 64);
            for (int m = 0; m < MB; m++) {
                __m512i x = _mm512_load_si512(a->xt + ((r0 + m) * nch + c) * 64 * REGS + 64 * k);
                /* one load for both weight rows: GCC would fold it into each dpbusd, and
                 * loads (about one 64-byte load per cycle) are what limits this loop */
                if (NB > 1) __asm__("" : "+v"(x));
                for (int j = 0; j < NB; j++) ia[j][m] = _mm512_dpbusd_epi32(ia[j][m], w[j], x);
            }
        }
        for (int m = 0; m < MB; m++) {
            const int64_t lane = (r0 + m) * nch * 16 + 16 * c;
            const __m512 xv = _mm512_load_ps(a->xv + lane);
            for (int j = 0; j < NB; j++) {
                const float *ws = (const float *)(buf + j * row_stride + nch * 64 * REGS);
                acc[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[j][m]),
                                            _mm512_mul_ps(_mm512_load_ps(ws + 16 * c), xv), acc[j][m]);
                if (ASYM)
                    acc[j][m] = _mm512_fmadd_ps(_mm512_load_ps(ws + 16 * (nch + c)),
                                                _mm512_load_ps(a->xs + lane), acc[j][m]);
            }
        }
    }
    for (int j = 0; j < NB; j++)
        for (int m = 0; m < MB; m++) out[j][m] = _mm512_reduce_add_ps(acc[j][m]);
}

/* weight row -> row buffer: nch transposed chunks, then nch x 16 scales, nch x 16 min terms */
static inline __attribute__((always_inline)) void unpack_row(const int T, const uint8_t *row,
                                                             int64_t K, int64_t nch,
                                                             uint8_t *buf) {
    const int REGS = chunk_regs_of(T);
    float *ws = (float *)(buf + nch * 64 * REGS), *wm = ws + 16 * nch;
    for (int64_t c = 0; c < nch; c++) {
        __m512i R[8];
        __m512 s, mn;
        chunk_regs(T, row, K / block_elems(T), c, R, &s, &mn);
        for (int k = 0; k < REGS; k++) _mm512_store_si512(buf + (c * REGS + k) * 64, R[k]);
        _mm512_store_ps(ws + 16 * c, s);
        _mm512_store_ps(wm + 16 * c, mn);
    }
}

static inline int64_t row_buffer_bytes(int qtype, int64_t nch) {
    return nch * (chunk_elems(qtype) + 2 * 64);
}

/* More rows (9-16): unpack weight rows two at a time into a per-thread buffer (L1/L2-resident)
 * and take the activation rows in tiles of up to 4 (dot_tile). */
static inline __attribute__((always_inline)) void rows_buffered(
        const int T, const uint8_t *W, int64_t row_bytes, const act_t *a, int64_t r0,
        int64_t M, int64_t K, int64_t n0, int64_t n1, void *Y, int64_t ldy, int y_is_bf16,
        uint8_t *buf) {
    const int REGS = chunk_regs_of(T), ASYM = offset_of(T) == 0;
    const int64_t nch = a->nch, rs = row_buffer_bytes(T, nch);
    const int64_t packed = K / block_elems(T) * block_bytes(T);
    for (int64_t n = n0; n < n1; n += 2) {
        const int nb = n + 1 < n1 ? 2 : 1;
        for (int j = 0; j < nb; j++) unpack_row(T, W + (n + j) * row_bytes, K, nch, buf + j * rs);
        /* Ask for the pair of rows after next now (into L2), so that it streams in while the
         * tiles below compute: otherwise memory sits idle during the tiles and the next
         * unpack waits for DRAM (16 rows, 2 threads: +12-25 % over no prefetch, measured;
         * one pair ahead into L1 gained nothing) */
        for (int64_t j = n + 4; j < n + 6 && j < n1; j++)
            for (int64_t o = 0; o < packed; o += 64)
                _mm_prefetch((const char *)(W + j * row_bytes + o), _MM_HINT_T2);
        float out[2][MAXM];
        for (int64_t m0 = 0; m0 < M; m0 += TILE_M) {
            const int64_t mb = M - m0 < TILE_M ? M - m0 : TILE_M;
            float o[2][TILE_M];
            /* constant tile shapes: loops unroll, accumulators stay in registers */
#define TILE(NB, MB) dot_tile(NB, MB, REGS, ASYM, buf, rs, a, r0 + m0, o)
            if (nb == 2) {
                switch (mb) {
                case 1: TILE(2, 1); break;
                case 2: TILE(2, 2); break;
                case 3: TILE(2, 3); break;
                default: TILE(2, 4); break;
                }
            } else {
                switch (mb) {
                case 1: TILE(1, 1); break;
                case 2: TILE(1, 2); break;
                case 3: TILE(1, 3); break;
                default: TILE(1, 4); break;
                }
            }
#undef TILE
            for (int j = 0; j < nb; j++)
                for (int64_t m = 0; m < mb; m++) out[j][m0 + m] = o[j][m];
        }
        for (int j = 0; j < nb; j++) store_out(Y, ldy, y_is_bf16, n + j, out[j], M);
    }
}

/* One function per type and fused row count (and per type for the tiles): as separate
 * functions each gets its own register allocation; inlined all into one, M = 1 ran 14 %
 * slower (measured). */
#define ARGS const uint8_t *W, int64_t row_bytes, const act_t *a, int64_t r0, int64_t M, \
    int64_t K, int64_t n0, int64_t n1, void *Y, int64_t ldy, int y_is_bf16, uint8_t *scratch
typedef void (*rows_fn)(ARGS);
#define FUSED_FN(T, m) \
    static __attribute__((noinline)) void fused_##T##_##m(ARGS) { \
        (void)M, (void)scratch; \
        rows_fused(T, m, W, row_bytes, a, r0, K, n0, n1, Y, ldy, y_is_bf16); \
    }
#define TYPE_FNS(T) \
    FUSED_FN(T, 1) FUSED_FN(T, 2) FUSED_FN(T, 3) FUSED_FN(T, 4) \
    FUSED_FN(T, 5) FUSED_FN(T, 6) FUSED_FN(T, 7) FUSED_FN(T, 8) \
    static __attribute__((noinline)) void buffered_##T(ARGS) { \
        rows_buffered(T, W, row_bytes, a, r0, M, K, n0, n1, Y, ldy, y_is_bf16, scratch); \
    } \
    static const rows_fn fns_##T[FUSED_M + 1] = {buffered_##T, fused_##T##_1, fused_##T##_2, \
        fused_##T##_3, fused_##T##_4, fused_##T##_5, fused_##T##_6, fused_##T##_7, \
        fused_##T##_8};
TYPE_FNS(Q4_0) TYPE_FNS(Q5_0) TYPE_FNS(Q5_1) TYPE_FNS(Q8_0) TYPE_FNS(Q4_K) TYPE_FNS(Q5_K)
TYPE_FNS(Q6_K)

/* Rows [n0, n1) of one weight matrix times activation rows r0 .. r0 + M - 1 into
 * Y[m * ldy + n]; scratch: a per-thread buffer from scratch_alloc (used from 9 rows). */
static void rows_product(int qtype, ARGS) {
    const rows_fn *fns = qtype == Q4_0 ? fns_Q4_0 : qtype == Q5_0 ? fns_Q5_0
                       : qtype == Q5_1 ? fns_Q5_1 : qtype == Q8_0 ? fns_Q8_0
                       : qtype == Q4_K ? fns_Q4_K : qtype == Q5_K ? fns_Q5_K : fns_Q6_K;
    fns[M > FUSED_M ? 0 : M](W, row_bytes, a, r0, M, K, n0, n1, Y, ldy, y_is_bf16, scratch);
}
#undef TYPE_FNS
#undef FUSED_FN
#undef ARGS

static int64_t chunks_of(int qtype, int64_t K) {
    return (K + chunk_elems(qtype) - 1) / chunk_elems(qtype);
}

static uint8_t *scratch_alloc(int qtype, int64_t nch) { /* two rows for rows_buffered */
    return aligned_alloc(64, (size_t)(2 * row_buffer_bytes(qtype, nch)));
}

/* The shared front of both products: type and shape checks, transposed activation rows. */
static int prepare(int qtype, int64_t K, int64_t R, const int8_t *xq, const float *xd,
                   const int32_t *xsum, act_t *a) {
    if (!supported(qtype)) return QERR_TYPE;
    if (K <= 0 || K % block_elems(qtype) != 0 || R < 0) return QERR_SHAPE;
    if (act_alloc(a, R, chunks_of(qtype, K), chunk_elems(qtype))) return QERR_NOMEM;
    act_layout(qtype, xq, xd, xsum, R, K, a);
    return 0;
}

/* Y[m, n] = sum_k W[n, k] X[m, k] for m < M (<= 16), n < N: W rows of type qtype,
 * activations from quantize_rows_q8, Y float32 or bf16 (y_is_bf16) with row stride ldy. */
int quant_matmul(int qtype, const uint8_t *W, int64_t row_bytes, const int8_t *xq,
                 const float *xd, const int32_t *xsum, void *Y, int64_t ldy, int y_is_bf16,
                 int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M <= 0 || M > MAXM || N < 0) return QERR_SHAPE;
    act_t a;
    int err = prepare(qtype, K, M, xq, xd, xsum, &a);
    if (err) return err;
    #pragma omp parallel num_threads(nthreads)
    {
        /* contiguous row ranges: each thread streams its own part of W */
        int64_t n0, n1;
        thread_share(N, 4, &n0, &n1);
        uint8_t *scratch = n0 < n1 ? scratch_alloc(qtype, a.nch) : NULL;
        if (scratch)
            rows_product(qtype, W, row_bytes, &a, 0, M, K, n0, n1, Y, ldy, y_is_bf16, scratch);
        else if (n0 < n1) {
            #pragma omp atomic write
            err = QERR_NOMEM;
        }
        free(scratch);
    }
    free(a.xt);
    return err;
}

/* Grouped product over a stacked weight tensor W [E, N, K] (expert e at W + e * expert_bytes):
 * group g multiplies activation rows start[g] .. start[g+1] (<= 16) by expert idx[g] into the
 * same rows of Y (row stride ldy). Work items of 64 weight rows are split across threads. */
int grouped_quant_matmul(int qtype, const uint8_t *W, int64_t expert_bytes, int64_t row_bytes,
                         const int64_t *idx, const int64_t *start, int64_t G, const int8_t *xq,
                         const float *xd, const int32_t *xsum, void *Y, int64_t ldy,
                         int y_is_bf16, int64_t N, int64_t K, int nthreads) {
    if (G < 0 || N < 0) return QERR_SHAPE;
    for (int64_t g = 0; g < G; g++)
        if (start[g] < 0 || start[g + 1] < start[g] || start[g + 1] - start[g] > MAXM)
            return QERR_SHAPE;
    const int64_t R = G ? start[G] : 0;
    act_t a;
    int err = prepare(qtype, K, R, xq, xd, xsum, &a);
    if (err) return err;
    const int64_t chunk = 64; /* weight rows per work item: balances the threads */
    const int64_t per_group = (N + chunk - 1) / chunk;
    #pragma omp parallel num_threads(nthreads)
    {
        uint8_t *scratch = scratch_alloc(qtype, a.nch);
        if (!scratch) {
            #pragma omp atomic write
            err = QERR_NOMEM;
        }
        #pragma omp for schedule(static)
        for (int64_t item = 0; item < G * per_group; item++) {
            const int64_t g = item / per_group, n0 = (item % per_group) * chunk;
            const int64_t n1 = n0 + chunk < N ? n0 + chunk : N, m = start[g + 1] - start[g];
            if (scratch && m > 0) {
                char *y = (char *)Y + start[g] * ldy * (y_is_bf16 ? 2 : 4);
                rows_product(qtype, W + idx[g] * expert_bytes, row_bytes, &a, start[g], m, K,
                             n0, n1, y, ldy, y_is_bf16, scratch);
            }
        }
        free(scratch);
    }
    free(a.xt);
    return err;
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
