"""DeepSeek-V2 / V2-Lite / V3 (GGUF ``deepseek2``) as one readable model.

The model takes a ``ForwardBatch`` (flat tokens + paged-cache addressing) and a latent KV pool
and returns float32 logits for the requested rows. It knows nothing of HTTP or scheduling;
how ranks share the work enters only through a ``Shard`` (which heads and experts are held
here), a tensor-parallel all-reduce and a MoE ``Dispatcher``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llama_mpi.models.attention import MLAttention
from llama_mpi.models.config import ModelConfig
from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.fused_decode import MAX_ROWS as MAX_FUSED_ROWS
from llama_mpi.models.fused_decode import FusedDecoder
from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.kernels.fast_linear import embedding, linear
from llama_mpi.models.kernels.quant_backend import choose_backend
from llama_mpi.models.kv_cache import LatentKVPool
from llama_mpi.models.layers import SwiGLU, rms_norm
from llama_mpi.models.quant_weight import QuantWeight
from llama_mpi.models.rope import RotaryEmbedding
from llama_mpi.models.shard import Shard
from llama_mpi.models.weight_loader import Weight, WeightPolicy, load_weight
from llama_mpi.moe.dispatcher import Dispatcher, LocalDispatcher
from llama_mpi.moe.moe_layer import MoE

log = logging.getLogger(__name__)

GRAPH_MODES = ("off", "on")

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class RuntimeOptions:
    dtype: torch.dtype = torch.float32
    absorbed_mla: bool = True  # config enable_mla
    fused_moe: bool = True  # config enable_fused_moe
    shard: Shard = field(default_factory=Shard)
    all_reduce: AllReduce = _identity  # sums TP partial results across ranks
    dispatcher: Dispatcher = field(default_factory=LocalDispatcher)
    layer_devices: list[torch.device] | None = None  # layer split; None: all on `device`
    vocab_comm: Any = None  # a Communicator: split the LM head's rows across its ranks
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    quant_backend: str = "auto"  # see quant_backend.choose_backend
    use_mmap: bool = True
    # decode steps (<= 16 rows) in one native call per layer where the model allows it
    # (fused_decode.py); False: always the eager torch path
    fused_decode: bool = True
    # "on": decode steps as captured graphs where the device has them. On a CPU that is the
    # fused native layers (as fused_decode: on); CUDA graphs / Ascend GE are not written yet,
    # so there it logs one line and decodes eagerly. "off": nothing beyond fused_decode.
    graph_mode: str = "off"


class Block:
    """One transformer layer: MLA attention then a dense FFN or a MoE."""

    def __init__(self, cfg: ModelConfig, attn: MLAttention, ffn: SwiGLU | MoE,
                 attn_norm: torch.Tensor, ffn_norm: torch.Tensor, opts: RuntimeOptions) -> None:
        self.cfg, self.attn, self.ffn = cfg, attn, ffn
        self.attn_norm, self.ffn_norm, self.opts = attn_norm, ffn_norm, opts

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        # sum TP partials in float32: the residual stream is float32 anyway (alone, the
        # add below promotes the partial to float32 without a separate copy)
        all_reduce = self.opts.all_reduce
        return partial if all_reduce is _identity else all_reduce(partial.float())

    def __call__(self, x: torch.Tensor, batch: ForwardBatch, pool: LatentKVPool,
                 rot: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.attn_norm, self.cfg.rms_norm_eps)
        x = x + self.reduce(self.attn(h, batch, pool, rot))
        return self.ffn_part(x)

    def ffn_part(self, x: torch.Tensor) -> torch.Tensor:
        """The residual stream after this layer's FFN or MoE (eager)."""
        h = rms_norm(x, self.ffn_norm, self.cfg.rms_norm_eps)
        if isinstance(self.ffn, SwiGLU):
            return x + self.reduce(self.ffn(h))
        routed, shared = self.ffn(h)
        if self.ffn.dispatcher.complete:  # routed sum is whole here; only shared is partial
            return x + routed + (self.reduce(shared) if shared is not None else 0)
        partial = routed if shared is None else routed + shared
        return x + self.reduce(partial)


class DeepseekV2:
    def __init__(self, cfg: ModelConfig, embed: Weight, blocks: list[Block],
                 norm: torch.Tensor, head: Weight, opts: RuntimeOptions,
                 policy: WeightPolicy | None = None) -> None:
        self.cfg, self.embed, self.blocks = cfg, embed, blocks
        self.norm, self.head, self.opts = norm, head, opts
        self.policy = policy  # what stayed mapped from the file and what was copied
        self.devices = opts.layer_devices or [opts.device] * cfg.num_layers
        self.rope = {d: RotaryEmbedding(cfg, d) for d in set(self.devices)}
        self._fused: FusedDecoder | None = None  # built on the first decode step that wants it
        self._fused_built = False
        self._fallbacks: set[str] = set()  # reasons already logged
        if opts.graph_mode not in GRAPH_MODES:
            raise ValueError(f"graph_mode must be one of {GRAPH_MODES}, not {opts.graph_mode!r}")
        if opts.graph_mode == "on" and any(d.type != "cpu" for d in self.devices):
            log.info("graph_mode: decode graph capture is not implemented for %s; decode "
                     "steps run eagerly", sorted({d.type for d in self.devices}))

    @classmethod
    def from_gguf(cls, gf: GGUFFile, cfg: ModelConfig, opts: RuntimeOptions) -> DeepseekV2:
        dt, shard, E, V = opts.dtype, opts.shard, cfg.hidden_size, cfg.vocab_size
        devices = opts.layer_devices or [opts.device] * cfg.num_layers
        policy = WeightPolicy(dt, choose_backend(opts.quant_backend, devices[0]),
                              use_mmap=opts.use_mmap)
        heads = shard.heads(cfg.num_heads)
        blocks = []

        def dense_columns(align: int) -> tuple[int, int]:  # a dense FFN's columns here
            return shard.columns(cfg.intermediate_size, align=align)

        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            attn = MLAttention.from_gguf(gf, cfg, i, heads, opts.absorbed_mla, policy)
            if cfg.is_moe_layer(i):
                ffn: SwiGLU | MoE = MoE.from_gguf(gf, cfg, i, shard, opts.dispatcher,
                                                  opts.fused_moe, policy)
            else:
                ffn = SwiGLU.from_gguf(gf, p + "ffn", "", E, cfg.intermediate_size,
                                       dense_columns, policy)
            block = Block(cfg, attn, ffn, gf.load(p + "attn_norm.weight", dt, expect=(E,)),
                          gf.load(p + "ffn_norm.weight", dt, expect=(E,)), opts)
            blocks.append(_to_device(block, devices[i]))
        embed = load_weight(gf, "token_embd.weight", policy, expect=(V, E)).to(devices[0])
        head_name = "token_embd.weight" if cfg.tie_word_embeddings else "output.weight"
        v0, v1 = 0, V
        if opts.vocab_comm is not None:
            n, r = opts.vocab_comm.world_size, opts.vocab_comm.rank
            if V % n:
                raise ValueError(f"vocab_parallel: {n} ranks do not divide the vocabulary "
                                 f"of {V}; turn vocab_parallel off")
            v0, v1 = r * V // n, (r + 1) * V // n
        head = load_weight(gf, head_name, policy, start=v0, stop=v1, expect=(V, E))
        norm = gf.load("output_norm.weight", dt, expect=(E,)).to(devices[-1])
        return cls(cfg, embed, blocks, norm, head.to(devices[-1]), opts, policy)

    def make_kv_pool(self, num_blocks: int, block_size: int) -> LatentKVPool:
        c = self.cfg
        return LatentKVPool(c.num_layers, num_blocks, block_size, c.kv_lora_rank,
                            c.qk_rope_head_dim, self.opts.dtype, list(self.devices))

    @property
    def vocab_parallel(self) -> bool:
        return self.opts.vocab_comm is not None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: LatentKVPool, logits: bool = True
                ) -> torch.Tensor | None:
        """Float32 logits ``[len(batch.logits_indices), vocab]``; writes the batch's latents.

        ``logits=False`` skips the LM head (a rank whose logits nobody reads); with a
        vocab-parallel head every rank must compute its slice."""
        dev = self.devices[0]
        batch = batch.to(dev)
        # the residual stream stays float32 (as in llama.cpp); matmuls run in the compute dtype
        x = embedding(batch.input_ids, self.embed)
        rot = {dev: self.rope[dev].rotations(batch.positions)}
        fused = self._fused_for(batch, pool)
        if fused is not None:
            x = fused.run_layers(x, batch, pool, rot[dev])
        else:
            for block, d in zip(self.blocks, self.devices, strict=True):
                if d != x.device:  # layer split: hand the activations to the next device
                    x, batch = x.to(d), batch.to(d)
                if d not in rot:
                    rot[d] = self.rope[d].rotations(batch.positions)
                x = block(x, batch, pool, rot[d])
        if not logits and not self.vocab_parallel:
            return None
        if fused is not None and 0 < batch.logits_indices.numel() <= MAX_FUSED_ROWS:
            out = fused.logits(x, batch.logits_indices)
        else:
            x = rms_norm(x[batch.logits_indices], self.norm, self.cfg.rms_norm_eps)
            out = linear(x, self.head).float()
        if self.vocab_parallel:
            out = self.opts.vocab_comm.all_gather(out.contiguous(), dim=1)
        return out

    __call__ = forward

    @property
    def fused_decode(self) -> bool:
        """Whether decode steps may run in native per-layer calls (``fused_decode.py``)."""
        return self.opts.fused_decode

    @fused_decode.setter
    def fused_decode(self, on: bool) -> None:
        self.opts.fused_decode = bool(on)

    def fused_decoder(self) -> FusedDecoder | None:
        """The model's native decode layers, built on first use; None where it has none."""
        if not self._fused_built:
            self._fused, self._fused_built = FusedDecoder.build(self), True
        return self._fused

    def _fused_for(self, batch: ForwardBatch, pool: LatentKVPool) -> FusedDecoder | None:
        """The fused decoder if this step can run on it, else None (a new reason for the
        eager path is logged once)."""
        wanted = self.opts.fused_decode or self.opts.graph_mode == "on"
        if not wanted or batch.num_tokens > MAX_FUSED_ROWS:
            return None
        fused = self.fused_decoder()
        if fused is None:  # this model cannot run fused (logged once by build)
            return None
        why = fused.accepts(batch, pool)
        if why is None:
            return fused
        if why not in self._fallbacks:
            self._fallbacks.add(why)
            log.info("decode step runs eagerly: %s", why)
        return None

    def param_counts(self) -> dict[str, int]:
        """Parameters held here: routed experts, per-head attention, the replicated latent
        projections, and the rest."""
        experts = attn = latent = other = 0
        for b in self.blocks:
            heads, rep = b.attn.num_params()
            attn, latent = attn + heads, latent + rep
            if isinstance(b.ffn, MoE):
                e, o = b.ffn.num_params()
                experts, other = experts + e, other + o
            else:
                other += b.ffn.num_params()
        other += self.embed.numel() + self.head.numel()
        return {"experts": experts, "attention": attn, "latent": latent, "other": other}


def _to_device(block: Block, device: torch.device) -> Block:
    if device.type == "cpu":
        return block  # loaded on the CPU already; avoid copies of mmap-backed tensors
    for obj in _modules(block):
        for k, v in vars(obj).items():
            if isinstance(v, torch.Tensor | QuantWeight):
                setattr(obj, k, v.to(device))
            elif isinstance(v, dict):
                setattr(obj, k, {n: t.to(device) for n, t in v.items()})
    return block


def _modules(block: Block) -> list[object]:
    mods: list[object] = [block, block.attn]
    if isinstance(block.ffn, MoE):
        mods += [block.ffn.router, block.ffn.experts]
        mods += [block.ffn.shared] if block.ffn.shared is not None else []
    else:
        mods.append(block.ffn)
    return mods
