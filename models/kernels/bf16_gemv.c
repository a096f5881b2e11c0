/* Skinny bf16 matrix product for decode: Y[m][n] = sum_k X[m][k] * W[n][k], M <= 16.
 *
 * Decode multiplies a few activation rows by large weight matrices, so it is bound by how
 * fast the weights stream from memory. torch's CPU path reaches ~21 GB/s here; this kernel
 * walks each weight row once for all M activation rows, multiplies bf16 pairs with
 * AVX512-BF16 (vdpbf16ps, float32 accumulation), and splits rows across torch's own OpenMP
 * threads. Output is bf16, rounded to nearest even.
 */
#include <immintrin.h>
#include <stdint.h>

#include "kernel_util.h"

#define MAXM 16

/* Prefetch the next block of four weight rows into the last-level cache while this block
 * computes. Without it, memory and arithmetic take turns: a 4-row block read once from DRAM
 * and then reused for every chunk of activation rows leaves the memory idle during the
 * reuse, so 8 activation rows streamed weights at ~21 GB/s instead of ~33 (measured).
 * Always inlined: as a call per k step it cost the whole gain (measured too). */
static inline __attribute__((always_inline)) void prefetch_next_block(
        const uint16_t *w0, int64_t k, int64_t K) {
    for (int r = 0; r < 4; r++) /* rows w0 .. w0 + 3K are the current block */
        _mm_prefetch((const char *)(w0 + (4 + r) * K + k), _MM_HINT_T2);
}

/* Four weight rows against MC (<= 4) activation rows: 4 x MC accumulators stay in registers
 * and four independent weight streams keep enough loads in flight. */
static inline __attribute__((always_inline)) void block4(
        const int64_t MC, const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t N,
        int64_t K, int64_t n) {
    const int64_t kfull = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - kfull)) - 1ull);
    __m512 a[4][4];
    for (int r = 0; r < 4; r++)
        for (int64_t m = 0; m < MC; m++) a[r][m] = _mm512_setzero_ps();
    const uint16_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    for (int64_t k = 0; k < kfull; k += 32) {
        prefetch_next_block(w0, k, K);
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + k);
        __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + k);
        __m512bh v2 = (__m512bh)_mm512_loadu_si512(w2 + k);
        __m512bh v3 = (__m512bh)_mm512_loadu_si512(w3 + k);
        for (int64_t m = 0; m < MC; m++) {
            __m512bh x = (__m512bh)_mm512_loadu_si512(X + m * K + k);
            a[0][m] = _mm512_dpbf16_ps(a[0][m], v0, x);
            a[1][m] = _mm512_dpbf16_ps(a[1][m], v1, x);
            a[2][m] = _mm512_dpbf16_ps(a[2][m], v2, x);
            a[3][m] = _mm512_dpbf16_ps(a[3][m], v3, x);
        }
    }
    if (tail) {
        __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + kfull);
        __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w1 + kfull);
        __m512bh v2 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w2 + kfull);
        __m512bh v3 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w3 + kfull);
        for (int64_t m = 0; m < MC; m++) {
            __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(tail, X + m * K + kfull);
            a[0][m] = _mm512_dpbf16_ps(a[0][m], v0, x);
            a[1][m] = _mm512_dpbf16_ps(a[1][m], v1, x);
            a[2][m] = _mm512_dpbf16_ps(a[2][m], v2, x);
            a[3][m] = _mm512_dpbf16_ps(a[3][m], v3, x);
        }
    }
    for (int64_t m = 0; m < MC; m++)
        for (int r = 0; r < 4; r++)
            Y[m * N + n + r] = f32_to_bf16(_mm512_reduce_add_ps(a[r][m]));
}

/* always inlined with a constant M, so the per-row accumulators live in registers */
static inline __attribute__((always_inline)) void rows_m(
        const int64_t M, const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t N,
        int64_t K, int64_t n0, int64_t n1) {
    const int64_t kfull = K & ~(int64_t)31;
    const __mmask32 tail = (__mmask32)((1ull << (K - kfull)) - 1ull);
    int64_t n = n0;
    if (M == 1) { /* decode: four independent weight streams keep more loads in flight */
        for (; n + 4 <= n1; n += 4) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const uint16_t *w0 = W + n * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
            for (int64_t k = 0; k < kfull; k += 32) {
                prefetch_next_block(w0, k, K);
                __m512bh x = (__m512bh)_mm512_loadu_si512(X + k);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + k), x);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + k), x);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + k), x);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + k), x);
            }
            if (tail) {
                __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(tail, X + kfull);
                a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + kfull), x);
                a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w1 + kfull), x);
                a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(tail, w2 + kfull), x);
                a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(tail, w3 + kfull), x);
            }
            Y[n] = f32_to_bf16(_mm512_reduce_add_ps(a0));
            Y[n + 1] = f32_to_bf16(_mm512_reduce_add_ps(a1));
            Y[n + 2] = f32_to_bf16(_mm512_reduce_add_ps(a2));
            Y[n + 3] = f32_to_bf16(_mm512_reduce_add_ps(a3));
        }
    }
    if (M > 1) { /* blocks of four rows; activation rows in chunks of four (L1-hot reuse) */
        for (; n + 4 <= n1; n += 4) {
            for (int64_t mc = 0; mc < M; mc += 4) {
                const uint16_t *xc = X + mc * K;
                uint16_t *yc = Y + mc * N;
                switch (M - mc < 4 ? M - mc : 4) {
                case 1: block4(1, W, xc, yc, N, K, n); break;
                case 2: block4(2, W, xc, yc, N, K, n); break;
                case 3: block4(3, W, xc, yc, N, K, n); break;
                default: block4(4, W, xc, yc, N, K, n); break;
                }
            }
        }
    }
    for (; n + 2 <= n1; n += 2) { /* two weight rows at a time share the X loads */
        __m512 a0[MAXM], a1[MAXM];
        for (int64_t m = 0; m < M; m++) a0[m] = a1[m] = _mm512_setzero_ps();
        const uint16_t *w0 = W + n * K, *w1 = w0 + K;
        for (int64_t k = 0; k < kfull; k += 32) {
            __m512bh v0 = (__m512bh)_mm512_loadu_si512(w0 + k);
            __m512bh v1 = (__m512bh)_mm512_loadu_si512(w1 + k);
            for (int64_t m = 0; m < M; m++) {
                __m512bh x = (__m512bh)_mm512_loadu_si512(X + m * K + k);
                a0[m] = _mm512_dpbf16_ps(a0[m], v0, x);
                a1[m] = _mm512_dpbf16_ps(a1[m], v1, x);
            }
        }
        if (tail) {
            __m512bh v0 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + kfull);
            __m512bh v1 = (__m512bh)_mm512_maskz_loadu_epi16(tail, w1 + kfull);
            for (int64_t m = 0; m < M; m++) {
                __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(tail, X + m * K + kfull);
                a0[m] = _mm512_dpbf16_ps(a0[m], v0, x);
                a1[m] = _mm512_dpbf16_ps(a1[m], v1, x);
            }
        }
        for (int64_t m = 0; m < M; m++) {
            Y[m * N + n] = f32_to_bf16(_mm512_reduce_add_ps(a0[m]));
            Y[m * N + n + 1] = f32_to_bf16(_mm512_reduce_add_ps(a1[m]));
        }
    }
    for (; n < n1; n++) {
        const uint16_t *w0 = W + n * K;
        for (int64_t m = 0; m < M; m++) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t k = 0; k < kfull; k += 32)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(w0 + k),
                                     (__m512bh)_mm512_loadu_si512(X + m * K + k));
            if (tail)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + kfull),
                                     (__m512bh)_mm512_maskz_loadu_epi16(tail, X + m * K + kfull));
            Y[m * N + n] = f32_to_bf16(_mm512_reduce_add_ps(a));
        }
    }
}

static void rows(const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t M, int64_t N,
                 int64_t K, int64_t n0, int64_t n1) {
    if (M == 1)
        rows_m(1, W, X, Y, N, K, n0, n1);
    else /* the 4-row blocks specialise per chunk; only the last few rows see a runtime M */
        rows_m(M, W, X, Y, N, K, n0, n1);
}

/* W: [N, K] row-major; X: [M, K]; Y: [M, N]; all bf16 bit patterns. */
void skinny_bf16_matmul(const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t M,
                        int64_t N, int64_t K, int nthreads) {
    if (M <= 0 || M > MAXM) return;
    #pragma omp parallel num_threads(nthreads)
    {
        /* contiguous row ranges (multiples of 4): each thread streams its own part of W */
        int64_t n0, n1;
        thread_share(N, 4, &n0, &n1);
        if (n0 < n1) rows(W, X, Y, M, N, K, n0, n1);
    }
}

/* The same product per batch entry: Y[b] = X[b] @ W[b]^T (W: [B, N, K], X: [B, M, K]),
 * for MLA's per-head k_b / v_b products on a decode step. */
void batched_skinny_bf16_matmul(const uint16_t *W, const uint16_t *X, uint16_t *Y, int64_t B,
                                int64_t M, int64_t N, int64_t K, int nthreads) {
    if (M <= 0 || M > MAXM) return;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < B; b++)
        rows(W + b * N * K, X + b * M * K, Y + b * M * N, M, N, K, 0, N);
}

/* Grouped product over a stacked weight tensor W: [E, N, K]. Group g multiplies its rows
 * X[start[g] : start[g+1]] (at most MAXM) by W[idx[g]]^T into the same rows of Y: [R, N].
 * A decode batch's routed experts in one call; rows of all groups are split across threads. */
void grouped_bf16_matmul(const uint16_t *W, const int64_t *idx, const int64_t *start,
                         const uint16_t *X, uint16_t *Y, int64_t G, int64_t N, int64_t K,
                         int nthreads) {
    const int64_t chunk = 64; /* weight rows per work item: balances the threads */
    const int64_t per_group = (N + chunk - 1) / chunk;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t item = 0; item < G * per_group; item++) {
        int64_t g = item / per_group, n0 = (item % per_group) * chunk;
        int64_t n1 = n0 + chunk < N ? n0 + chunk : N;
        int64_t m = start[g + 1] - start[g];
        if (m > 0 && m <= MAXM)
            rows(W + idx[g] * N * K, X + start[g] * K, Y + start[g] * N, m, N, K, n0, n1);
    }
}
