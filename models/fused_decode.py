"""Decode steps in one native call per layer (``decode_fused.c``), around the weight kernels.

The eager path (``DeepseekV2.forward``) runs ~50 small torch ops per layer for a decode
token; with tiny weights that is the whole step. ``FusedDecoder`` describes every layer's
weights once (pointers into the same tensors and GGUF blocks the eager path uses, no copies
except where a dense weight is not contiguous) and builds the per-step metadata (RoPE
rotations, pool slots, each row's context) once per step for all layers. Each layer is then
one C call, or two where a collective sits between attention and FFN (TP all-reduce), and
the FFN stays eager where its experts are exchanged all-to-all; the final norm and the LM
head are one more call.

The eager path stays the reference and the fallback: prefill, batches over 16 rows, float16,
non-CPU devices, and quantized weights outside the native backend all run eagerly (one log
line per reason). Numerics follow the eager path's roundings; tests/models/test_fused_decode.py
checks logits and greedy text against it.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING

import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.kernels.cpu_kernels import kernel, require_kernel
from llama_mpi.models.kernels.quant_backend import NativeCPUBackend
from llama_mpi.models.kv_cache import LatentKVPool
from llama_mpi.models.layers import SwiGLU
from llama_mpi.models.quant_weight import QuantWeight

if TYPE_CHECKING:
    from llama_mpi.models.deepseek_v2 import Block, DeepseekV2

log = logging.getLogger(__name__)

MAX_ROWS = 16  # token rows per fused step (the kernels' row limit)
MAX_PARTS = 4
_I64, _P, _D = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double


class _Part(ctypes.Structure):
    _fields_ = [("kind", _I64), ("rows", _I64), ("row_bytes", _I64), ("expert_bytes", _I64),
                ("data", _P)]


class _Mat(ctypes.Structure):
    _fields_ = [("nparts", _I64), ("N", _I64), ("K", _I64), ("p", _Part * MAX_PARTS)]


class _Layer(ctypes.Structure):
    _fields_ = ([(n, _I64) for n in ("E", "H", "C", "R", "Dn", "Dv", "Q", "bf16", "naive")]
                + [("eps", _D), ("scale", _D)]
                + [(n, _P) for n in ("attn_norm", "ffn_norm", "q_a_norm", "kv_a_norm", "k_b",
                                     "v_b")]
                + [("x_proj", _Mat), ("q_b", _Mat), ("o", _Mat)]
                + [(n, _I64) for n in ("moe", "has_shared", "complete")]
                + [("gate_up", _Mat), ("down", _Mat), ("router_w", _P), ("router_bias", _P)]
                + [(n, _I64) for n in ("X", "top_k", "groups", "groups_used", "sigmoid",
                                       "top2sum", "normalize")]
                + [("rscale", _D), ("eg", _Mat), ("ed", _Mat)]
                + [(n, _I64) for n in ("first", "count", "Fe", "index")])


class _Head(ctypes.Structure):
    _fields_ = [("E", _I64), ("bf16", _I64), ("eps", _D), ("norm", _P), ("w", _Mat)]


class _Step(ctypes.Structure):
    _fields_ = [("T", _I64), ("slot_mapping", _P), ("rope", _P), ("ctx_slots", _P),
                ("ctx_start", _P), ("ctx_len", _P), ("nthreads", _I64)]


ATTN, FFN, ADD_ATTN, ADD_FFN = 1, 2, 4, 8
_ERRORS = {-1: "unsupported quantization type", -2: "bad shape", -3: "out of memory"}


class Unsupported(Exception):
    """A model (or layer) the fused path does not take; the message says why."""


class FusedDecoder:
    """Native decode layers for one model; ``None`` from ``build`` where it cannot serve."""

    def __init__(self, model: DeepseekV2) -> None:
        self.model = model
        self.keep: list[torch.Tensor] = []  # tensors whose pointers the structs hold
        opts = model.opts
        if kernel() is None:
            raise Unsupported("no C kernels here")
        if opts.dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"compute dtype {opts.dtype}")
        if any(d.type != "cpu" for d in model.devices):
            raise Unsupported("layers on a non-CPU device")
        self.bf16 = opts.dtype is torch.bfloat16
        self.dtype = opts.dtype
        self.reduce = opts.all_reduce
        from llama_mpi.models.deepseek_v2 import _identity

        self.single = opts.all_reduce is _identity
        self.layers = [self._layer(b) for b in model.blocks]
        self.addrs = [ctypes.addressof(L) for L in self.layers]
        # per layer: does the FFN piece run natively (all-to-all experts stay eager)
        self.native_ffn = [bool(L.moe == 0 or self._dispatch_native(b))
                           for L, b in zip(self.layers, model.blocks, strict=True)]
        self.absorb_max = min(b.attn.absorb_max_queries for b in model.blocks)
        # also short multi-token chunks (<= 16 rows, causal per row): off, prefill stays
        # eager (float32 with int8 activations amplifies ulp-level differences there)
        self.chunks = False
        self.call = require_kernel().fused_decode_layer
        self.head = _Head(model.cfg.hidden_size, int(self.bf16), model.cfg.rms_norm_eps,
                          self._ptr(model.norm), self._mat(model.head))
        self.head_addr = ctypes.addressof(self.head)

    @staticmethod
    def build(model: DeepseekV2) -> FusedDecoder | None:
        try:
            return FusedDecoder(model)
        except Unsupported as e:
            log.info("fused decode off for this model (%s): decode steps run eagerly", e)
            return None

    # ---- description of the weights ----
    def _dense(self, t: torch.Tensor) -> torch.Tensor:
        if t.dtype != self.dtype or t.device.type != "cpu":
            raise Unsupported(f"a dense weight in {t.dtype} on {t.device}")
        t = t.contiguous()
        self.keep.append(t)
        return t

    def _mat(self, w: torch.Tensor | QuantWeight) -> _Mat:
        m = _Mat()
        if isinstance(w, QuantWeight):
            if not isinstance(w.backend, NativeCPUBackend):
                raise Unsupported(f"{w.name} on the {w.backend.name} backend")
            if len(w.parts) > MAX_PARTS:
                raise Unsupported(f"{w.name}: {len(w.parts)} row parts")
            m.nparts, m.N, m.K = len(w.parts), w.shape[-2], w.K
            for i, p in enumerate(w.parts):
                raw = p.raw
                if raw.shape[-1] > 1 and raw.stride(-1) != 1:
                    raise Unsupported(f"{w.name}: strided blocks")
                m.p[i].kind, m.p[i].rows, m.p[i].row_bytes = int(p.qtype), p.rows, raw.stride(-2)
                m.p[i].expert_bytes = raw.stride(0) if raw.dim() == 3 else 0
                m.p[i].data = raw.data_ptr()
            return m
        t = self._dense(w)
        es = t.element_size()
        m.nparts, m.N, m.K = 1, t.shape[-2], t.shape[-1]
        m.p[0].kind, m.p[0].rows, m.p[0].row_bytes = 0, t.shape[-2], t.stride(-2) * es
        m.p[0].expert_bytes = t.stride(0) * es if t.dim() == 3 else 0
        m.p[0].data = t.data_ptr()
        return m

    def _ptr(self, t: torch.Tensor | QuantWeight | None, dtype: torch.dtype | None = None
             ) -> int | None:
        if t is None:
            return None
        if isinstance(t, QuantWeight):
            raise Unsupported(f"{t.name} quantized where a dense tensor is needed")
        t = self._dense(t) if dtype is None else t.to(dtype).contiguous()
        self.keep.append(t)
        return t.data_ptr()

    @staticmethod
    def _dispatch_native(block: Block) -> bool:
        from llama_mpi.moe.dispatcher import LocalDispatcher
        from llama_mpi.moe.ep_dispatchers import AllReduceDispatcher
        from llama_mpi.moe.moe_layer import MoE

        ffn = block.ffn  # asked of MoE layers only
        return isinstance(ffn, MoE) and isinstance(ffn.dispatcher,
                                                   LocalDispatcher | AllReduceDispatcher)

    def _layer(self, block: Block) -> _Layer:
        from llama_mpi.moe.moe_layer import MoE

        cfg, a, w = block.cfg, block.attn, block.attn.w
        L = _Layer()
        L.E, L.H, L.C, L.R = cfg.hidden_size, a.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        L.Dn, L.Dv, L.Q = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.q_lora_rank or 0
        L.bf16, L.naive = int(self.bf16), int(not a.absorbed)
        L.eps, L.scale, L.index = cfg.rms_norm_eps, cfg.softmax_scale, a.layer
        if L.R % 2 or L.E % 32:
            raise Unsupported(f"rope dim {L.R} / hidden {L.E}")
        L.attn_norm, L.ffn_norm = self._ptr(block.attn_norm), self._ptr(block.ffn_norm)
        L.kv_a_norm, L.k_b, L.v_b = self._ptr(w["kv_a_norm"]), self._ptr(w["k_b"]), self._ptr(
            w["v_b"])
        L.x_proj, L.o = self._mat(w["x_proj"]), self._mat(w["o"])
        if "q_b" in w:
            L.q_a_norm, L.q_b = self._ptr(w["q_a_norm"]), self._mat(w["q_b"])
        ffn = block.ffn
        if isinstance(ffn, SwiGLU):
            L.moe, L.gate_up, L.down = 0, self._mat(ffn.gate_up), self._mat(ffn.down)
            return L
        if not isinstance(ffn, MoE):
            raise Unsupported(f"FFN of type {type(ffn).__name__}")
        L.moe, L.complete = 1, int(ffn.dispatcher.complete)
        if ffn.shared is not None:
            L.has_shared = 1
            L.gate_up, L.down = self._mat(ffn.shared.gate_up), self._mat(ffn.shared.down)
        r = ffn.router
        if r.weight.shape[0] > 1024 or r.top_k > 64 or r.groups > 256:
            raise Unsupported(f"router of {r.weight.shape[0]} experts, top {r.top_k}")
        L.router_w = self._ptr(r.weight, torch.float32)
        L.router_bias = self._ptr(r.bias, torch.float32)
        L.X, L.top_k, L.groups, L.groups_used = r.weight.shape[0], r.top_k, r.groups, \
            r.groups_used
        L.sigmoid, L.top2sum, L.normalize = int(r.sigmoid), int(r.top2sum), int(r.normalize)
        L.rscale = r.scale or 0.0
        ex = ffn.experts
        L.eg, L.ed, L.first, L.count = self._mat(ex.gate_up), self._mat(ex.down), ex.first, \
            ex.count
        L.Fe = ex.gate_up.shape[-2] // 2
        return L

    # ---- one step ----
    def accepts(self, batch: ForwardBatch, pool: LatentKVPool) -> str | None:
        """None when this step runs fused, else why not (logged once per reason)."""
        T = batch.num_tokens
        if not 0 < T <= MAX_ROWS:
            return f"{T} rows"
        longest = max(e - s for s, e in batch.spans())
        if longest > 1 and not self.chunks:
            return "prefill rows (a sequence with several new tokens)"
        if longest > self.absorb_max:
            return "a sequence's chunk is long enough for naive attention"
        if pool.data[0].dtype != self.dtype:
            return f"KV pool in {pool.data[0].dtype}"
        return None

    def run_layers(self, x: torch.Tensor, batch: ForwardBatch, pool: LatentKVPool,
                   rot: torch.Tensor) -> torch.Tensor:
        """Every layer of a decode step on the residual stream ``x`` ([T, E] float32)."""
        model = self.model
        ctx = batch.row_contexts(pool.block_size)
        rope = torch.view_as_real(rot).contiguous()
        slots = batch.slot_mapping.contiguous()
        step = _Step(batch.num_tokens, slots.data_ptr(), rope.data_ptr(), ctx.slots.data_ptr(),
                     ctx.start.data_ptr(), ctx.length.data_ptr(), torch.get_num_threads())
        sp = ctypes.addressof(step)
        x = x.contiguous()  # a fresh tensor of this step (the embedding rows), updated in place
        out = torch.empty_like(x)
        call, both = self.call, ATTN | FFN | ADD_ATTN | ADD_FFN
        for i, (addr, native) in enumerate(zip(self.addrs, self.native_ffn, strict=True)):
            cache = pool.data[i].data_ptr()
            if self.single and native:
                self._check(call(addr, sp, x.data_ptr(), out.data_ptr(), cache, both))
                continue
            if self.single:
                self._check(call(addr, sp, x.data_ptr(), out.data_ptr(), cache, ATTN | ADD_ATTN))
            else:
                self._check(call(addr, sp, x.data_ptr(), out.data_ptr(), cache, ATTN))
                x = x + self.reduce(out)
            if native:  # (single-process native FFNs ran in the one call above)
                self._check(call(addr, sp, x.data_ptr(), out.data_ptr(), cache, FFN))
                x = x + self.reduce(out)
            else:
                x = model.blocks[i].ffn_part(x)
        del rope, slots, ctx
        return x

    def logits(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of rows ``rows`` of ``x``: the final norm and the (local) LM head
        in one native call (the weight product with the layers' thread rules)."""
        rows = rows.contiguous()
        out = torch.empty(rows.shape[0], self.head.w.N, dtype=torch.float32)
        self._check(require_kernel().fused_decode_head(self.head_addr, x.data_ptr(),
                                                       rows.data_ptr(), rows.shape[0],
                                                       out.data_ptr(), torch.get_num_threads()))
        return out

    @staticmethod
    def _check(rc: int) -> None:
        if rc == -3:
            raise MemoryError("fused decode layer: out of memory")
        if rc != 0:
            raise RuntimeError(f"fused decode layer: {_ERRORS.get(rc, f'error {rc}')}")
