"""hf_to_gguf.convert against external references: a transformers DeepseekV2 model's own
weights and config, read back through gguf's GGUFReader and gguf.quants.dequantize."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from llama_mpi.models.gguf.hf_to_gguf import convert
from llama_mpi.models.gguf.random_weights import random_weights

transformers = pytest.importorskip("transformers", reason="HF reference model needs transformers")

QT = gguf.GGMLQuantizationType
YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}


def hf_model(q_lora: int | None) -> transformers.DeepseekV2ForCausalLM:
    """A small seeded HF model; qk_nope 16 makes attn_k_b rows too short for 32-blocks."""
    cfg = transformers.DeepseekV2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, q_lora_rank=q_lora, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=163840, rope_scaling=YARN, routed_scaling_factor=2.0)
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(cfg)
    with torch.no_grad():  # HF inits norms to exactly 1; perturb so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def read(path) -> tuple[dict[str, gguf.ReaderTensor], dict[str, object]]:
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def deq(t: gguf.ReaderTensor) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))


TABLE = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_proj": "attn_q", "self_attn.q_a_proj": "attn_q_a",
         "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
         "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa", "self_attn.kv_b_proj": "attn_kv_b",
         "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "mlp.gate": "ffn_gate_inp", "mlp.shared_experts.gate_proj": "ffn_gate_shexp",
         "mlp.shared_experts.up_proj": "ffn_up_shexp",
         "mlp.shared_experts.down_proj": "ffn_down_shexp",
         "mlp.experts.down_proj": "ffn_down_exps"}


def expected(sd: dict[str, torch.Tensor], fe: int) -> dict[str, torch.Tensor]:
    """GGUF name -> HF tensor, per the reference doc's mapping table (section 2)."""
    out = {}
    for name, w in sd.items():
        stem = name.removesuffix(".weight")
        blk, rest = "", stem
        if stem.startswith("model.layers."):
            i, rest = stem.split(".", 3)[2:]
            blk = f"blk.{i}."
        if rest == "mlp.experts.gate_up_proj":  # HF forward: gate, up = (x @ W.T).chunk(2)
            out[f"{blk}ffn_gate_exps.weight"], out[f"{blk}ffn_up_exps.weight"] = w.split(fe, 1)
        else:
            out[f"{blk}{TABLE[rest]}.weight"] = w
    return out


def dequantized(tensors: dict[str, gguf.ReaderTensor], cfg: dict) -> dict[str, tuple]:
    """GGUF name -> (float tensor, stored types); MLA k_b/v_b recombined into attn_kv_b."""
    h, dn, dv, c = (cfg[k] for k in ("num_attention_heads", "qk_nope_head_dim", "v_head_dim",
                                     "kv_lora_rank"))
    out = {n: (deq(t), {t.tensor_type}) for n, t in tensors.items() if "_b.weight" not in n
           or ".attn_kv_b." in n or ".attn_q_b." in n}
    for n in tensors:
        if n.endswith(".attn_k_b.weight"):
            k_b, v_b = tensors[n], tensors[n.replace("attn_k_b", "attn_v_b")]
            k, v = deq(k_b), deq(v_b)
            assert k.shape == (h, c, dn) and v.shape == (h, dv, c)
            kv_b = torch.cat([k.transpose(1, 2), v], 1).reshape(h * (dn + dv), c)
            out[n.replace("attn_k_b", "attn_kv_b")] = (kv_b, {k_b.tensor_type, v_b.tensor_type})
    return out


def assert_close(got: torch.Tensor, ref: torch.Tensor, qtypes: set, name: str) -> None:
    """Exact for F32; otherwise within the worst stored type's rounding/quantization error."""
    if qtypes == {QT.F32}:
        assert torch.equal(got, ref), name
        return
    err, amax = (got - ref).abs(), ref.abs().max().item()
    rel = max({QT.F32: 0.0, QT.F16: 2**-11, QT.BF16: 2**-8}.get(q, 0.0) for q in qtypes)
    # F16 subnormals step by 2**-24; Q8_0: half a step of amax/127; Q4_0: up to a full step
    # of amax/8 at the clipped end; both plus the f16 rounding of the block scale
    absolute = max({QT.F16: 2**-24, QT.Q8_0: amax / 200, QT.Q4_0: amax / 7.5}.get(q, 0.0)
                   for q in qtypes)
    assert (err <= ref.abs() * rel + absolute).all(), name


@pytest.mark.parametrize(("ftype", "layout"), [("f32", "mla"), ("f32", "legacy"),
                                               ("bf16", "mla"), ("q8_0", "mla"),
                                               ("q4_0", "legacy")])
def test_round_trip_reproduces_hf_weights(tmp_path, ftype, layout):
    model = hf_model(q_lora=None if layout == "legacy" else 48)
    sd, cfg = model.state_dict(), model.config.to_dict()
    tensors, _ = read(convert(sd, cfg, tmp_path / "m.gguf", ftype=ftype, layout=layout))
    want, got = expected(sd, cfg["moe_intermediate_size"]), dequantized(tensors, cfg)
    assert set(got) == set(want)
    for name, ref in want.items():
        tensor, qtypes = got[name]
        assert tensor.shape == ref.shape, name
        assert_close(tensor, ref.float(), qtypes, name)


def test_rows_not_divisible_by_block_fall_back_to_f16(tmp_path):
    model = hf_model(q_lora=None)
    tensors, _ = read(convert(model.state_dict(), model.config.to_dict(), tmp_path / "m.gguf",
                              ftype="q8_0", layout="mla"))
    assert tensors["blk.0.attn_k_b.weight"].tensor_type == QT.F16  # rows of qk_nope = 16
    assert tensors["blk.0.attn_v_b.weight"].tensor_type == QT.Q8_0  # rows of kv_lora = 32
    assert tensors["blk.1.ffn_gate_inp.weight"].tensor_type == QT.F32


def test_transformers_config_dict_gives_yarn_and_moe_keys(tmp_path):
    model = hf_model(q_lora=48)
    _, fields = read(convert(model.state_dict(), model.config.to_dict(), tmp_path / "m.gguf"))
    a = "deepseek2."
    assert fields[a + "rope.scaling.type"] == "yarn"
    assert fields[a + "rope.scaling.factor"] == 40.0
    assert fields[a + "rope.scaling.original_context_length"] == 4096
    assert fields[a + "rope.scaling.yarn_log_multiplier"] == pytest.approx(0.0707)
    assert fields[a + "expert_weights_scale"] == 2.0
    assert fields[a + "expert_gating_func"] == 1  # scoring_func absent -> softmax
    assert fields[a + "attention.q_lora_rank"] == 48
    assert a + "expert_group_count" not in fields  # HF default n_group None: not written


def test_callable_source_writes_same_bytes_as_mapping(tmp_path):
    model = hf_model(q_lora=None)
    sd, cfg = model.state_dict(), model.config.to_dict()
    a = convert(sd, cfg, tmp_path / "a.gguf", ftype="bf16")
    b = convert(lambda: reversed(list(sd.items())), cfg, tmp_path / "b.gguf", ftype="bf16")
    assert a.read_bytes() == b.read_bytes()


def test_score_correction_bias_becomes_f32_exp_probs_b(tmp_path):
    cfg = hf_model(q_lora=None).config.to_dict()
    cfg.update(topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True)
    weights = random_weights(cfg, seed=1)
    tensors, fields = read(convert(weights, cfg, tmp_path / "m.gguf", ftype="bf16"))
    bias = tensors["blk.1.exp_probs_b.bias"]
    assert bias.tensor_type == QT.F32 and list(bias.shape) == [cfg["n_routed_experts"]]
    ref = weights["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert torch.equal(deq(bias), ref)
    assert fields["deepseek2.expert_gating_func"] == 2
    assert fields["deepseek2.expert_weights_norm"] is True


def test_wrong_shape_is_rejected(tmp_path):
    model = hf_model(q_lora=None)
    sd = dict(model.state_dict())
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="o_proj"):
        convert(sd, model.config.to_dict(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
