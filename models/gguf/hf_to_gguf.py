"""Convert a Hugging Face DeepseekV2 state dict + config into a `deepseek2` GGUF.

Metadata keys, tensor names/shapes and the F32 rules follow llama.cpp's converter
(`DeepseekV2Model`, see shared/reference/gguf_deepseek2.md sections 1-2). Tensors are produced
and written one at a time, so a multi-GB model never sits in memory as fp32 at once.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from math import prod
from pathlib import Path

import gguf
import numpy as np
import torch

from .hf_metadata import HFConfig, write_metadata, write_vocab
from .quant_encode import quantize
from .quant_plan import FILE_TYPES, plan_types

ARCH = "deepseek2"
QT = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
# ftype name -> (default tensor type, general.file_type); per-tensor types: quant_plan
FTYPES: dict[str, tuple[QT, FT]] = FILE_TYPES
LAYOUTS = ("mla", "legacy")
TensorSource = Mapping[str, torch.Tensor] | Callable[[], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class _Out:
    """One GGUF tensor: HF sources (stacked on dim 0 when several), each mapped through `pick`."""

    name: str
    shape: tuple[int, ...]  # torch order; GGUF `ne` is the reverse
    sources: tuple[str, ...]
    pick: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)
    qtype: QT = QT.F32


def _plan(cfg: HFConfig, names: set[str], layout: str) -> list[_Out]:
    """GGUF tensors in write order, derived from the config and the HF names present."""
    e, heads, vocab = cfg["hidden_size"], cfg["num_attention_heads"], cfg["vocab_size"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    c, q, dk = cfg["kv_lora_rank"], cfg.get("q_lora_rank"), dn + dr
    x, fe = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    shared = (cfg.get("n_shared_experts") or 0) * fe
    outs = [_Out("token_embd.weight", (vocab, e), ("model.embed_tokens.weight",))]
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}", f"blk.{i}"
        a = f"{p}.self_attn"
        outs.append(_Out(f"{b}.attn_norm.weight", (e,), (f"{p}.input_layernorm.weight",)))
        if q:
            outs += [_Out(f"{b}.attn_q_a.weight", (q, e), (f"{a}.q_a_proj.weight",)),
                     _Out(f"{b}.attn_q_a_norm.weight", (q,), (f"{a}.q_a_layernorm.weight",)),
                     _Out(f"{b}.attn_q_b.weight", (heads * dk, q), (f"{a}.q_b_proj.weight",))]
        else:
            outs.append(_Out(f"{b}.attn_q.weight", (heads * dk, e), (f"{a}.q_proj.weight",)))
        kv_a = (f"{a}.kv_a_proj_with_mqa.weight",)
        outs += [_Out(f"{b}.attn_kv_a_mqa.weight", (c + dr, e), kv_a),
                 _Out(f"{b}.attn_kv_a_norm.weight", (c,), (f"{a}.kv_a_layernorm.weight",))]
        kv_b = (f"{a}.kv_b_proj.weight",)
        if layout == "mla":  # per head rows are [k_nope | v]; k_b is stored transposed
            outs += [_Out(f"{b}.attn_k_b.weight", (heads, c, dn), kv_b,
                          lambda t: t.view(heads, dn + dv, c)[:, :dn].transpose(1, 2)),
                     _Out(f"{b}.attn_v_b.weight", (heads, dv, c), kv_b,
                          lambda t: t.view(heads, dn + dv, c)[:, dn:])]
        else:
            outs.append(_Out(f"{b}.attn_kv_b.weight", (heads * (dn + dv), c), kv_b))
        outs += [_Out(f"{b}.attn_output.weight", (e, heads * dv), (f"{a}.o_proj.weight",)),
                 _Out(f"{b}.ffn_norm.weight", (e,), (f"{p}.post_attention_layernorm.weight",))]
        m = f"{p}.mlp"
        if i < (cfg.get("first_k_dense_replace") or 0):
            f = cfg["intermediate_size"]
            outs += [_Out(f"{b}.ffn_gate.weight", (f, e), (f"{m}.gate_proj.weight",)),
                     _Out(f"{b}.ffn_up.weight", (f, e), (f"{m}.up_proj.weight",)),
                     _Out(f"{b}.ffn_down.weight", (e, f), (f"{m}.down_proj.weight",))]
            continue
        outs.append(_Out(f"{b}.ffn_gate_inp.weight", (x, e), (f"{m}.gate.weight",)))
        if f"{m}.gate.e_score_correction_bias" in names:
            outs.append(_Out(f"{b}.exp_probs_b.bias", (x,), (f"{m}.gate.e_score_correction_bias",)))
        outs += _expert_outs(m, b, x, fe, e, names)
        if shared:
            sh = f"{m}.shared_experts"
            outs += [_Out(f"{b}.ffn_gate_shexp.weight", (shared, e), (f"{sh}.gate_proj.weight",)),
                     _Out(f"{b}.ffn_up_shexp.weight", (shared, e), (f"{sh}.up_proj.weight",)),
                     _Out(f"{b}.ffn_down_shexp.weight", (e, shared), (f"{sh}.down_proj.weight",))]
    outs.append(_Out("output_norm.weight", (e,), ("model.norm.weight",)))
    if not cfg.get("tie_word_embeddings") and "lm_head.weight" in names:
        outs.append(_Out("output.weight", (vocab, e), ("lm_head.weight",)))
    return outs


def _expert_outs(m: str, b: str, x: int, fe: int, e: int, names: set[str]) -> list[_Out]:
    """Routed experts: per-expert checkpoint names, or transformers 5.x fused 3-D parameters."""
    ex = f"{m}.experts"
    if f"{ex}.gate_up_proj" in names:
        gate_up = (f"{ex}.gate_up_proj",)  # [X, 2*Fe, E], gate rows first (forward uses chunk(2))
        return [_Out(f"{b}.ffn_gate_exps.weight", (x, fe, e), gate_up, lambda t: t[:, :fe]),
                _Out(f"{b}.ffn_up_exps.weight", (x, fe, e), gate_up, lambda t: t[:, fe:]),
                _Out(f"{b}.ffn_down_exps.weight", (x, e, fe), (f"{ex}.down_proj",))]
    per = {w: tuple(f"{ex}.{j}.{w}_proj.weight" for j in range(x)) for w in ("gate", "up", "down")}
    return [_Out(f"{b}.ffn_gate_exps.weight", (x, fe, e), per["gate"]),
            _Out(f"{b}.ffn_up_exps.weight", (x, fe, e), per["up"]),
            _Out(f"{b}.ffn_down_exps.weight", (x, e, fe), per["down"])]


def _tensor_qtypes(outs: list[_Out], cfg: HFConfig, ftype: str) -> dict[str, QT]:
    """1-D, *_norm, ffn_gate_inp, non-.weight stay F32; the rest as llama-quantize picks."""
    return plan_types(((o.name, o.shape) for o in outs), ftype, cfg["num_hidden_layers"],
                      cfg["n_routed_experts"])


def _encode(t: torch.Tensor, qtype: QT) -> np.ndarray:
    t = t.detach().to("cpu", torch.float32).contiguous()
    if qtype == QT.F32:
        return t.numpy()
    if qtype == QT.F16:
        return t.to(torch.float16).numpy()
    if qtype == QT.BF16:  # round-to-nearest-even, like gguf.quants' BF16
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return quantize(t.numpy(), qtype)  # K-quants: our encoder; 32-blocks: gguf.quants


class _Fetcher:
    """Name -> tensor over a Mapping, or over a callable's iterator read ahead into a buffer."""

    def __init__(self, src: TensorSource, needs: Counter[str]) -> None:
        self._map: Mapping[str, torch.Tensor] | None = None
        self._factory: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None
        if isinstance(src, Mapping):
            self._map = src
        else:
            self._factory = src
        self._needs = needs
        self._buf: dict[str, torch.Tensor] = {}
        self._it: Iterator[tuple[str, torch.Tensor]] | None = None

    def names(self) -> list[str]:
        if self._map is not None:
            return list(self._map.keys())
        assert self._factory is not None  # one of the two is set
        return [n for n, _ in self._factory()]  # names-only pass; tensors dropped at once

    def get(self, name: str) -> torch.Tensor:
        self._needs[name] -= 1
        if self._map is not None:
            return self._map[name]
        if name not in self._buf:
            assert self._factory is not None
            self._it = self._it or iter(self._factory())
            for n, t in self._it:
                if n == name or self._needs.get(n, 0) > 0:
                    self._buf[n] = t
                if n == name:
                    break
            else:
                raise KeyError(f"HF tensor {name!r} not produced by the source")
        return self._buf[name] if self._needs[name] > 0 else self._buf.pop(name)


def _materialize(out: _Out, fetch: _Fetcher) -> np.ndarray:
    """Encode one GGUF tensor, filling stacked slots one source at a time."""
    data: np.ndarray | None = None
    for j, src in enumerate(out.sources):
        piece = out.pick(fetch.get(src))
        want = out.shape[1:] if len(out.sources) > 1 else out.shape
        if tuple(piece.shape) != tuple(want):
            raise ValueError(f"{src}: shape {tuple(piece.shape)} does not fit {out.name} {want}")
        enc = _encode(piece, out.qtype)
        if len(out.sources) == 1:
            return enc
        if data is None:
            data = np.empty((len(out.sources), *enc.shape), dtype=enc.dtype)
        data[j] = enc
        del piece, enc
    assert data is not None
    return data


def convert(state_dict: TensorSource, config: HFConfig, out_path: str | os.PathLike,
            *, ftype: str = "f32", layout: str = "mla", vocab: Mapping[str, object] | None = None,
            name: str = "DeepSeek-V2") -> Path:
    """Write `state_dict` (HF names) + HF DeepseekV2 `config` as a llama.cpp `deepseek2` GGUF.

    `state_dict` is a Mapping (may be lazy: only one value is held at a time) or a callable
    returning an iterable of (name, tensor) pairs; a callable is run twice (names, then data).
    The file is written to a temporary name and renamed, so readers never see half a file.
    """
    if ftype not in FTYPES or layout not in LAYOUTS:
        raise ValueError(f"ftype must be one of {list(FTYPES)}, layout one of {LAYOUTS}")
    file_type = FTYPES[ftype][1]
    needs: Counter[str] = Counter()
    fetch = _Fetcher(state_dict, needs)
    outs = _plan(config, set(fetch.names()), layout)
    qtypes = _tensor_qtypes(outs, config, ftype)
    for out in outs:
        out.qtype = qtypes[out.name]
        needs.update(out.sources)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        write_metadata(w, config, layout, file_type, name)
        if vocab:
            write_vocab(w, vocab)
        for out in outs:
            nbytes = prod(gguf.quants.quant_shape_to_byte_shape(out.shape, out.qtype))
            # raw_dtype fixes the GGML type; the numpy dtype is only a placeholder here
            w.add_tensor_info(out.name, out.shape, np.dtype(np.float32), nbytes,
                              raw_dtype=out.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for out in outs:
            w.write_tensor_data(_materialize(out, fetch))
        w.close()
        os.replace(tmp, out_path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return out_path
