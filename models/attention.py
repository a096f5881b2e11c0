"""Multi-head latent attention (MLA) over the paged latent cache, in two forms.

Both forms cache the same thing per token: ``c_kv`` (normalised, ``kv_lora_rank`` values) and
the roped shared key ``k_pe``. *Naive* expands the latent through ``k_b``/``v_b`` into
per-head keys and values (transformers' and llama.cpp's legacy graph). *Absorbed* folds
``k_b`` into the query and ``v_b`` after the attention, so attention runs directly over the
576-wide latent (DeepSeek's inference code, llama.cpp's MLA graph); it reads far less per
decoded token. Under TP a rank holds a contiguous range of heads and returns a partial
output-projection sum.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llama_mpi.models.config import ModelConfig
from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.kernels.fast_linear import batched_linear, linear
from llama_mpi.models.kv_cache import LatentKVPool
from llama_mpi.models.latent_attention import RowContexts, available, latent_attention
from llama_mpi.models.layers import rms_norm
from llama_mpi.models.rope import apply_rope
from llama_mpi.models.weight_loader import (
    Weight,
    WeightPolicy,
    as_dense,
    load_weight,
    stack_rows,
)


class MLAttention:
    def __init__(self, cfg: ModelConfig, layer: int, heads: tuple[int, int], absorbed: bool,
                 w: dict[str, Weight]) -> None:
        self.cfg, self.layer, self.absorbed = cfg, layer, absorbed
        self.n_heads = heads[1] - heads[0]
        # Absorbed attention costs about (2C + R) multiply-adds per (query, key) pair, naive
        # about (Dk + Dv) plus a one-off C x (Dn + Dv) expansion per key: long prefill chunks
        # are cheaper naive (vLLM does the same); decode and short chunks stay absorbed.
        per_pair = 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim - cfg.qk_head_dim - cfg.v_head_dim
        self.absorb_max_queries = cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim
                                                      ) // max(per_pair, 1)
        # x_proj = (q | q_a) stacked with kv_a; q_a_norm, q_b; kv_a_norm; k_b [h,C,Dn];
        # v_b [h,Dv,C]; o
        self.w = w

    def dense(self, key: str) -> torch.Tensor:
        """One of the weights loaded dense: the norms, ``k_b`` and ``v_b``."""
        return as_dense(self.w[key], key)

    @classmethod
    def from_gguf(cls, gf: GGUFFile, cfg: ModelConfig, layer: int, heads: tuple[int, int],
                  absorbed: bool, policy: WeightPolicy) -> MLAttention:
        p, (h0, h1) = f"blk.{layer}.", heads
        E, H, C, R = cfg.hidden_size, cfg.num_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        Dk, Dn, Dv = cfg.qk_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
        w: dict[str, Weight] = {}

        def load(name: str, *, dim: int = 0, start: int | None = None, stop: int | None = None,
                 expect: tuple[int, ...] | None = None, dense: bool = False) -> Weight:
            return load_weight(gf, p + name + ".weight", policy, dim=dim, start=start, stop=stop,
                               expect=expect, dense=dense)

        if cfg.q_lora_rank:
            Q = cfg.q_lora_rank
            w["q_a"] = load("attn_q_a", expect=(Q, E))
            w["q_a_norm"] = load("attn_q_a_norm", expect=(Q,), dense=True)
            w["q_b"] = load("attn_q_b", start=h0 * Dk, stop=h1 * Dk, expect=(H * Dk, Q))
        else:
            w["q"] = load("attn_q", start=h0 * Dk, stop=h1 * Dk, expect=(H * Dk, E))
        w["kv_a"] = load("attn_kv_a_mqa", expect=(C + R, E))
        w["kv_a_norm"] = load("attn_kv_a_norm", expect=(C,), dense=True)
        # k_b / v_b run as batched per-head products: small (~2 MB a layer), kept dense
        if cfg.legacy_kv_b:
            kv_b = as_dense(load("attn_kv_b", start=h0 * (Dn + Dv), stop=h1 * (Dn + Dv),
                                 expect=(H * (Dn + Dv), C), dense=True), "attn_kv_b")
            kv_b = kv_b.view(h1 - h0, Dn + Dv, C)
            w["k_b"] = kv_b[:, :Dn].transpose(1, 2).contiguous()
            w["v_b"] = kv_b[:, Dn:].contiguous()
        else:
            w["k_b"] = load("attn_k_b", start=h0, stop=h1, expect=(H, C, Dn), dense=True)
            w["v_b"] = load("attn_v_b", start=h0, stop=h1, expect=(H, Dv, C), dense=True)
        w["o"] = load("attn_output", dim=1, start=h0 * Dv, stop=h1 * Dv, expect=(E, H * Dv))
        # the two projections of x (q or q_a, and kv_a) as one weight: one product per step
        first = "q_a" if cfg.q_lora_rank else "q"
        names = [f"{p}attn_{first}.weight", f"{p}attn_kv_a_mqa.weight"]
        w["x_proj"] = stack_rows(gf, [w.pop(first), w.pop("kv_a")], names, policy)
        return cls(cfg, layer, heads, absorbed, w)

    def num_params(self) -> tuple[int, int]:
        """(per-head parameters held here, replicated latent-projection parameters: q_a,
        kv_a and their norms, computed on every rank)."""
        cfg, w = self.cfg, self.w
        kv_rows = cfg.kv_lora_rank + cfg.qk_rope_head_dim
        lat_rows = kv_rows + (cfg.q_lora_rank or 0)  # rows of x_proj every rank holds
        rep = lat_rows * cfg.hidden_size + w["kv_a_norm"].numel()
        rep += w["q_a_norm"].numel() if "q_a_norm" in w else 0
        return sum(t.numel() for t in w.values()) - rep, rep

    def __call__(self, x: torch.Tensor, batch: ForwardBatch, pool: LatentKVPool,
                 rot: torch.Tensor) -> torch.Tensor:
        cfg, w, T = self.cfg, self.w, x.shape[0]
        C, Dn = cfg.kv_lora_rank, cfg.qk_nope_head_dim
        proj = linear(x, w["x_proj"])  # [T, q (or q_a) | kv_a]
        kv = proj[:, -(C + cfg.qk_rope_head_dim):]
        q = proj[:, : -(C + cfg.qk_rope_head_dim)]
        if "q_b" in w:
            q = linear(rms_norm(q, self.dense("q_a_norm"), cfg.rms_norm_eps), w["q_b"])
        q = q.reshape(T, self.n_heads, cfg.qk_head_dim)
        c_kv = rms_norm(kv[:, :C], self.dense("kv_a_norm"), cfg.rms_norm_eps)
        # the shared key's rope part rides along with the query heads: one rotation call
        pe = apply_rope(torch.cat([q[..., Dn:], kv[:, None, C:]], dim=1), rot)
        q_nope, q_pe, k_pe = q[..., :Dn], pe[:, :-1], pe[:, -1]
        pool.write(self.layer, batch.slot_mapping, torch.cat([c_kv, k_pe], dim=-1))
        spans = batch.spans()
        absorb = [self.absorbed and e - s <= self.absorb_max_queries for s, e in spans]
        cache = pool.layer(self.layer)
        fast = any(absorb) and available(x.dtype, x.device)
        if fast:  # every absorbed row of the batch in one kernel call, straight from the pool
            ctx = batch.row_contexts(pool.block_size)
            if all(absorb):
                return linear(self._absorbed_rows(q_nope, q_pe, cache, ctx).flatten(1), w["o"])
        out = torch.empty(T, self.n_heads, cfg.v_head_dim, dtype=x.dtype, device=x.device)
        if fast:
            rows = torch.cat([torch.arange(s, e) for (s, e), a in zip(spans, absorb, strict=True)
                              if a])
            ctx = RowContexts(ctx.slots, ctx.start[rows], ctx.length[rows])
            out[rows] = self._absorbed_rows(q_nope[rows], q_pe[rows], cache, ctx)
        context = batch.context_slots(pool.block_size)
        for b, (s, e) in enumerate(spans):
            if fast and absorb[b]:
                continue
            latent = cache[context[b]]
            if absorb[b]:
                q_abs = batched_linear(q_nope[s:e].transpose(0, 1), self.dense("k_b"))
                q_abs = q_abs.transpose(0, 1)
                out[s:e] = self._absorbed(q_abs, q_pe[s:e], latent)
            else:
                out[s:e] = self._naive(q_nope[s:e], q_pe[s:e], latent)
        return linear(out.flatten(1), w["o"])

    def _absorbed_rows(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                       ctx: RowContexts) -> torch.Tensor:
        """Absorbed attention of any rows of any sequences via the C kernel: [R, h, Dv]."""
        q_abs = batched_linear(q_nope.transpose(0, 1), self.dense("k_b")).transpose(0, 1)
        q = torch.cat([q_abs, q_pe.to(q_abs.dtype)], dim=-1)
        o_lat = latent_attention(q, cache, ctx, self.cfg.kv_lora_rank, self.cfg.softmax_scale)
        return batched_linear(o_lat.transpose(0, 1), self.dense("v_b")).transpose(0, 1)

    def _scores_softmax(self, scores: torch.Tensor) -> torch.Tensor:
        """Causal softmax over ``[h, q, L]`` scores; the q new tokens are the last of L."""
        q, L = scores.shape[-2], scores.shape[-1]
        if q > 1:
            mask = torch.ones(q, L, dtype=torch.bool, device=scores.device).tril(L - q)
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores.float() * self.cfg.softmax_scale, dim=-1)

    def _absorbed(self, q_abs: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
                  ) -> torch.Tensor:
        C, h, q = self.cfg.kv_lora_rank, q_abs.shape[1], q_abs.shape[0]
        # one 2-D matmul over (heads x queries): the single latent K/V is shared by all heads,
        # so it is never broadcast (a batched matmul would copy it once per head)
        qcat = torch.cat([q_abs, q_pe], dim=-1).transpose(0, 1).reshape(h * q, -1)
        scores = torch.mm(qcat, latent.t()).view(h, q, -1)  # [h, q, L]
        probs = self._scores_softmax(scores).to(latent.dtype).view(h * q, -1)
        o_lat = torch.mm(probs, latent[:, :C]).view(h, q, C)
        o = batched_linear(o_lat, self.dense("v_b"))  # [h, q, Dv]
        return o.transpose(0, 1)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor
               ) -> torch.Tensor:
        C = self.cfg.kv_lora_rank
        c_kv, k_pe = latent[:, :C], latent[:, C:]
        k_nope = torch.einsum("lc,hcd->hld", c_kv, self.dense("k_b"))
        v_b = self.dense("v_b")  # [h, Dv, C]: one plain matmul over its rows, no weight copy
        v = F.linear(c_kv, v_b.reshape(-1, C)).view(c_kv.shape[0], v_b.shape[0], -1)
        v = v.transpose(0, 1)
        k = torch.cat([k_nope, k_pe.unsqueeze(0).expand(k_nope.shape[0], -1, -1)], dim=-1)
        qh = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [h, q, Dk]
        probs = self._scores_softmax(torch.matmul(qh, k.transpose(1, 2)))
        return torch.matmul(probs.to(v.dtype), v).transpose(0, 1)

