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
#include "decode_fused_attention.h"

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
