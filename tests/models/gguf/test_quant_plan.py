"""Per-tensor types for DeepSeek-V2-Lite's real shapes (27 layers, hidden 2048, experts of
1408, dense ffn 10944, 64 experts + 2 shared, kv_lora 512), MLA and legacy layouts.

The tables below are literal and equal what llama.cpp's own `llama-quantize` chooses, checked
with the llama.cpp tree vendored in llama-cpp-python 0.3.36 (llama.cpp build 0c1e570, built from
the sdist, `build/bin/llama-quantize`): bf16 files with V2-Lite's row lengths and 27 layers but
2 routed experts and a 1024-token vocab, made with
`build_model(path, preset="v2-lite", ftype="bf16", layout=..., n_routed_experts=2,
num_experts_per_tok=1, vocab_size=1024)`, then `llama-quantize in.gguf out.gguf Q4_K_M 2`
(and Q5_K_M, Q6_K, Q8_0, Q4_0), types read back with gguf.GGUFReader: 0 mismatches with
`plan_types` for every tensor, both layouts, all five ftypes. The expert count changes no type
unless it is 8 (`test_expert_count_other_than_8_changes_nothing`); the 8-expert rules were
checked the same way on the `lite` preset (8 experts), and `full` (q_lora) and `tiny` too, both
layouts (these need `--override-kv deepseek2.attention.q_lora_rank=int:0`: llama.cpp only lets
26/27-layer files omit q_lora_rank): 0 mismatches.
"""

from __future__ import annotations

from collections import Counter

import gguf
import pytest

from llama_mpi.models.gguf.builder import preset_config
from llama_mpi.models.gguf.hf_to_gguf import _plan
from llama_mpi.models.gguf.quant_plan import plan_types, use_more_bits
from llama_mpi.models.gguf.random_weights import hf_weight_specs

QT = gguf.GGMLQuantizationType
N_LAYER = 27
# use_more_bits(i, 27): first 3, last 4, and every third layer from 5
MORE = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26}

COUNTS = {
    ("mla", "q4_k_m"): {"F32": 108, "Q4_K": 229, "Q5_0": 41, "Q6_K": 13, "Q8_0": 13},
    ("mla", "q5_k_m"): {"F32": 108, "Q5_K": 229, "Q5_1": 41, "Q6_K": 13, "Q8_0": 13},
    ("mla", "q6_k"): {"F32": 108, "Q6_K": 242, "Q8_0": 54},
    ("mla", "q8_0"): {"F32": 108, "Q8_0": 296},
    ("mla", "q4_0"): {"F32": 108, "Q4_0": 295, "Q6_K": 1},
    ("legacy", "q4_k_m"): {"F32": 108, "Q4_K": 216, "Q5_0": 14, "Q6_K": 26, "Q8_0": 13},
    ("legacy", "q5_k_m"): {"F32": 108, "Q5_K": 216, "Q5_1": 14, "Q6_K": 26, "Q8_0": 13},
    ("legacy", "q6_k"): {"F32": 108, "Q6_K": 242, "Q8_0": 27},
    ("legacy", "q8_0"): {"F32": 108, "Q8_0": 269},
    ("legacy", "q4_0"): {"F32": 108, "Q4_0": 268, "Q6_K": 1},
}
# tensor kind -> type in every layer, or (type in MORE layers, type in the others)
KINDS = {
    "q4_k_m": {"token_embd": "Q4_K", "output": "Q6_K", "attn_q": "Q4_K",
               "attn_kv_a_mqa": "Q4_K", "attn_output": "Q4_K", "attn_kv_b": ("Q6_K", "Q4_K"),
               "attn_k_b": "Q5_0", "attn_v_b": "Q4_K", "ffn_gate": "Q4_K", "ffn_up": "Q4_K",
               "ffn_down": "Q8_0", "ffn_gate_exps": "Q4_K", "ffn_up_exps": "Q4_K",
               "ffn_down_exps": ("Q8_0", "Q5_0"), "ffn_gate_shexp": "Q4_K",
               "ffn_up_shexp": "Q4_K", "ffn_down_shexp": ("Q6_K", "Q4_K")},
    "q5_k_m": {"token_embd": "Q5_K", "output": "Q6_K", "attn_q": "Q5_K",
               "attn_kv_a_mqa": "Q5_K", "attn_output": "Q5_K", "attn_kv_b": ("Q6_K", "Q5_K"),
               "attn_k_b": "Q5_1", "attn_v_b": "Q5_K", "ffn_gate": "Q5_K", "ffn_up": "Q5_K",
               "ffn_down": "Q8_0", "ffn_gate_exps": "Q5_K", "ffn_up_exps": "Q5_K",
               "ffn_down_exps": ("Q8_0", "Q5_1"), "ffn_gate_shexp": "Q5_K",
               "ffn_up_shexp": "Q5_K", "ffn_down_shexp": ("Q6_K", "Q5_K")},
    "q6_k": {"token_embd": "Q6_K", "output": "Q6_K", "attn_q": "Q6_K", "attn_kv_a_mqa": "Q6_K",
             "attn_output": "Q6_K", "attn_kv_b": "Q6_K", "attn_k_b": "Q8_0", "attn_v_b": "Q6_K",
             "ffn_gate": "Q6_K", "ffn_up": "Q6_K", "ffn_down": "Q8_0", "ffn_gate_exps": "Q6_K",
             "ffn_up_exps": "Q6_K", "ffn_down_exps": "Q8_0", "ffn_gate_shexp": "Q6_K",
             "ffn_up_shexp": "Q6_K", "ffn_down_shexp": "Q6_K"},
}
# layers 1..26 (layer 0 is dense), per file type
DOWN_EXPS = {
    "q4_k_m": ("Q8_0 Q8_0 Q5_0 Q5_0 Q8_0 Q5_0 Q5_0 Q8_0 Q5_0 Q5_0 Q8_0 Q5_0 Q5_0 Q8_0 Q5_0 "
               "Q5_0 Q8_0 Q5_0 Q5_0 Q8_0 Q5_0 Q5_0 Q8_0 Q8_0 Q8_0 Q8_0"),
    "q5_k_m": ("Q8_0 Q8_0 Q5_1 Q5_1 Q8_0 Q5_1 Q5_1 Q8_0 Q5_1 Q5_1 Q8_0 Q5_1 Q5_1 Q8_0 Q5_1 "
               "Q5_1 Q8_0 Q5_1 Q5_1 Q8_0 Q5_1 Q5_1 Q8_0 Q8_0 Q8_0 Q8_0"),
    "q6_k": " ".join(["Q8_0"] * 26),
    "q8_0": " ".join(["Q8_0"] * 26),
}


def v2_lite_types(ftype: str, layout: str, **overrides: object) -> dict[str, str]:
    cfg = preset_config("v2-lite", **overrides)
    outs = _plan(cfg, set(hf_weight_specs(cfg)), layout)
    got = plan_types([(o.name, o.shape) for o in outs], ftype, cfg["num_hidden_layers"],
                     cfg["n_routed_experts"])
    assert len(got) == len(outs)
    return {n: q.name for n, q in got.items()}


def test_use_more_bits_layers_for_27():
    assert {i for i in range(N_LAYER) if use_more_bits(i, N_LAYER)} == MORE


@pytest.mark.parametrize(("layout", "ftype"), list(COUNTS))
def test_type_counts(layout, ftype):
    assert dict(Counter(v2_lite_types(ftype, layout).values())) == COUNTS[layout, ftype]


@pytest.mark.parametrize("layout", ["mla", "legacy"])
@pytest.mark.parametrize("ftype", list(KINDS))
def test_type_per_tensor_kind_and_layer(layout, ftype):
    types = v2_lite_types(ftype, layout)
    for name, qtype in types.items():
        parts = name.split(".")
        if parts[0] != "blk":
            kind, layer = parts[0], None
        else:
            kind, layer = parts[2], int(parts[1])
        if name.endswith("_norm.weight") or kind == "ffn_gate_inp":
            assert qtype == "F32", name
            continue
        want = KINDS[ftype][kind]
        if isinstance(want, tuple):
            want = want[0] if layer in MORE else want[1]
        assert qtype == want, name


@pytest.mark.parametrize("ftype", list(DOWN_EXPS))
@pytest.mark.parametrize("layout", ["mla", "legacy"])
def test_ffn_down_exps_per_layer(ftype, layout):
    types = v2_lite_types(ftype, layout)
    got = [types[f"blk.{i}.ffn_down_exps.weight"] for i in range(1, N_LAYER)]
    assert got == DOWN_EXPS[ftype].split()


def test_q8_0_and_q4_0_uniform_but_output():
    q8, q4 = v2_lite_types("q8_0", "mla"), v2_lite_types("q4_0", "legacy")
    assert {q for n, q in q8.items() if q != "F32"} == {"Q8_0"}
    assert {n for n, q in q4.items() if q not in ("F32", "Q4_0")} == {"output.weight"}
    assert q4["output.weight"] == "Q6_K"


@pytest.mark.parametrize("ftype", ["f32", "f16", "bf16"])
def test_float_ftypes_keep_converter_rule(ftype):
    types = v2_lite_types(ftype, "mla")
    assert set(types.values()) == {"F32", ftype.upper()}
    assert types["blk.3.ffn_gate_inp.weight"] == types["blk.3.attn_norm.weight"] == "F32"


@pytest.mark.parametrize("layout", ["mla", "legacy"])
def test_expert_count_other_than_8_changes_nothing(layout):
    """Why the llama-quantize check with 2 experts stands for the real 64."""
    few = v2_lite_types("q4_k_m", layout, n_routed_experts=2, num_experts_per_tok=1)
    assert few == v2_lite_types("q4_k_m", layout)


def test_eight_experts_take_the_mixtral_rules():
    """llama.cpp keys these on n_expert == 8 alone: attn_v-like -> Q8_0, attn_output Q5_K."""
    t = v2_lite_types("q4_k_m", "legacy", n_routed_experts=8, num_experts_per_tok=2)
    assert {t[f"blk.{i}.attn_kv_b.weight"] for i in range(N_LAYER)} == {"Q8_0"}
    assert {t[f"blk.{i}.attn_output.weight"] for i in range(N_LAYER)} == {"Q5_K"}
    m = v2_lite_types("q4_k_m", "mla", n_routed_experts=8, num_experts_per_tok=2)
    assert m["blk.4.attn_k_b.weight"] == "Q5_0" and m["blk.4.attn_v_b.weight"] == "Q4_K"


def test_fallbacks_and_tied_output():
    e = 2048
    tensors = [("token_embd.weight", (1000, e)), ("blk.0.attn_q.weight", (300, 160)),
               ("blk.0.ffn_down.weight", (e, 1408)), ("blk.0.attn_output.weight", (e, 48)),
               ("blk.0.attn_norm.weight", (e,))]
    got = plan_types(tensors, "q4_k_m", n_layer=1, n_expert=0)
    assert got["token_embd.weight"] == QT.Q6_K  # no output.weight: the embedding doubles
    assert got["blk.0.attn_q.weight"] == QT.Q5_0  # 160 = 5 x 32
    assert got["blk.0.ffn_down.weight"] == QT.Q8_0  # Q6_K (layer 0 of 1) -> Q8_0
    assert got["blk.0.attn_output.weight"] == QT.F16  # 48: not even a 32-block fits
    assert got["blk.0.attn_norm.weight"] == QT.F32
    with pytest.raises(ValueError, match="ftype"):
        plan_types(tensors, "q3_k_m", n_layer=1, n_expert=0)
