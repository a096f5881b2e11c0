/* Quantized GGUF blocks as the VNNI kernels see them (quant_matmul.c, quant_rows.c):
 * type constants, unpacking a chunk of a weight row into transposed registers, and
 * activation rows laid out to match (quant_acts.h). Numerics: quant_matmul.c.
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
 * weight row once into a small per-thread buffer and work in register tiles (rows_buffered). */
#ifndef LLAMA_MPI_QUANT_BLOCKS_H
#define LLAMA_MPI_QUANT_BLOCKS_H

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

#endif
