"""Per-tensor GGML types for a file type, as llama.cpp's `llama-quantize` picks them.

Follows `llama_tensor_get_type` / `llama_tensor_get_type_impl` / `tensor_type_fallback` in
llama.cpp's src/llama-quant.cpp (the tree vendored in llama-cpp-python 0.3.36), restricted to
the branches the ftypes here reach, for `deepseek2` tensor names. Checked against the real
`llama-quantize` (tests/models/gguf/test_quant_plan.py). Against shared/reference/quantized_gguf.md
section 1: its V2-Lite table holds. One difference: the doc calls the `n_expert == 8` rules
Mixtral-only, but the source keys them on the expert count alone, so any 8-expert deepseek2
(our `lite` preset) gets attn_kv_b -> Q8_0 and (Q4_K_M) attn_output -> Q5_K; llama-quantize
agrees. The attn_v-like class holds `attn_kv_b` only (legacy files): the MLA split `attn_k_b` /
`attn_v_b` match no category ("attn_v.weight" is not in "attn_v_b.weight"): default type.
Float ftypes keep the converter's rule (F32 where llama.cpp never quantizes, else the type).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import gguf

QT = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
# name -> (default tensor type, general.file_type)
FILE_TYPES: dict[str, tuple[QT, FT]] = {
    "f32": (QT.F32, FT.ALL_F32),
    "f16": (QT.F16, FT.MOSTLY_F16),
    "bf16": (QT.BF16, FT.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, FT.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, FT.MOSTLY_Q4_0),
    "q4_k_m": (QT.Q4_K, FT.MOSTLY_Q4_K_M),
    "q5_k_m": (QT.Q5_K, FT.MOSTLY_Q5_K_M),
    "q6_k": (QT.Q6_K, FT.MOSTLY_Q6_K),
}
FLOAT_TYPES = (QT.F32, QT.F16, QT.BF16)
# tensor_type_fallback: row length (ne0) not a multiple of the block -> a 32-block type
FALLBACK = {QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0}
# category_is_attn_v; llama.cpp's later attn_qkv-only branch is unreachable behind it
ATTN_V_LIKE = ("attn_v", "attn_qkv", "attn_kv_b")
_LAYER = re.compile(r"blk\.(\d+)\.")


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's layer pick for a higher type: the first and last eighth, every third between.

    C `%` truncates toward zero; for i < n/8 the first clause already holds, so Python's `%`
    gives the same answer.
    """
    return (i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8
            or (i_layer - n_layer // 8) % 3 == 2)


def category(name: str) -> str:
    """tensor_get_category: substring tests, in llama.cpp's order."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"),
                     ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization, for the names deepseek2 has; `shape` in torch order."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:  # ggml_n_dims ignores trailing (outer) ne of 1
        dims.pop(0)
    return (len(dims) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def _block(qtype: QT) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def fallback(qtype: QT, ne0: int) -> QT:
    """tensor_type_fallback: a type whose block divides the row, F16 if even that fails."""
    if ne0 % _block(qtype) == 0:
        return qtype
    qtype = FALLBACK.get(qtype, qtype)
    return qtype if ne0 % _block(qtype) == 0 else QT.F16


def _sort_key(name: str) -> tuple[int, str]:
    """weight_name_comparer (llama-model-loader.h): non-layer tensors first, then by layer."""
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def plan_types(tensors: Iterable[tuple[str, Sequence[int]]], ftype: str, n_layer: int,
               n_expert: int) -> dict[str, QT]:
    """Tensor name -> GGML type for `ftype`; `tensors` are (name, torch-order shape) pairs."""
    if ftype not in FILE_TYPES:
        raise ValueError(f"ftype must be one of {list(FILE_TYPES)}, got {ftype!r}")
    default = FILE_TYPES[ftype][0]
    tensors = sorted(tensors, key=lambda t: _sort_key(t[0]))
    names = {n for n, _ in tensors}
    if default in FLOAT_TYPES:
        return {n: default if allows_quantization(n, s) else QT.F32 for n, s in tensors}
    n_attn_v = sum(category(n) in ATTN_V_LIKE for n in names)
    tied = "output.weight" not in names
    i_attn_v = i_ffn_down = 0
    out: dict[str, QT] = {}
    for name, shape in tensors:
        if not allows_quantization(name, shape):
            out[name] = QT.F32  # what the converter wrote; llama-quantize copies it
            continue
        cat, ne0, new = category(name), int(shape[-1]), default
        if cat == "output" or (tied and cat == "token_embd"):
            if ne0 % _block(default):
                new = QT.Q8_0
            elif default != QT.Q8_0:
                new = QT.Q6_K
        elif cat in ATTN_V_LIKE:
            if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_attn_v, n_attn_v):
                new = QT.Q6_K
            if n_expert == 8:  # llama.cpp's Mixtral-era rule, applied to any 8-expert model
                new = QT.Q8_0
            i_attn_v += 1
        elif cat == "attn_k" and n_expert == 8:
            new = QT.Q8_0
        elif cat == "ffn_down":
            # MoE models parse the layer from the name (experts are not visited in order)
            m = _LAYER.match(name)
            i_layer = int(m.group(1)) if n_expert > 1 and m else i_ffn_down
            if ftype in ("q4_k_m", "q5_k_m") and use_more_bits(i_layer, n_layer):
                new = QT.Q6_K
            i_ffn_down += 1
        elif cat == "attn_output" and n_expert == 8 and ftype == "q4_k_m":
            new = QT.Q5_K
        out[name] = fallback(new, ne0)
    return out
