/* decode_fused.c's attention piece: q/kv projections, RoPE, the latent-cache write, and
 * absorbed or naive MLA over the paged cache, then the output projection. Private to
 * decode_fused.c: included once, there (static, one unit). */
#ifndef LLAMA_MPI_DECODE_FUSED_ATTENTION_H
#define LLAMA_MPI_DECODE_FUSED_ATTENTION_H

#include "decode_fused_ops.h"

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


#endif
