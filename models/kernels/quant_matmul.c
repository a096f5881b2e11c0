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
 * Layout: see quant_blocks.h ("lanes = groups").
 *
 * Weight row n starts at W + n * row_bytes (row_bytes may exceed the packed row: column
 * slices of a wider tensor). Entry points return 0, or QERR_* (unknown type, bad shape,
 * allocation failure) without touching the output.
 */
#include "quant_acts.h"

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
