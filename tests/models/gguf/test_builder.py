"""Built test models, read back with gguf's own GGUFReader and checked against the
reference doc (shared/reference/gguf_deepseek2.md sections 1, 2 and 4) and transformers."""

from __future__ import annotations

import gguf
import pytest
import torch

from llama_mpi.models.gguf.builder import build_model, main, preset_config
from llama_mpi.models.gguf.builtin_vocab import CHAT_TEMPLATE, builtin_vocab, vocab_from_gguf
from llama_mpi.models.gguf.quant_plan import plan_types
from llama_mpi.models.gguf.random_weights import random_weights
from tests.fixtures import DEEPSEEK_VOCAB

QT, VT = gguf.GGMLQuantizationType, gguf.GGUFValueType
VOCAB_GGUF = DEEPSEEK_VOCAB


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[tuple[str, str], gguf.GGUFReader]:
    out = tmp_path_factory.mktemp("built")
    return {(p, lay): gguf.GGUFReader(build_model(out / f"{p}-{lay}.gguf", preset=p, layout=lay))
            for p in ("lite", "full") for lay in ("mla", "legacy")}


def ne_table(cfg: dict, layout: str) -> dict[str, list[int]]:
    """Tensor name -> GGUF `ne` (fastest first), straight from the reference shape table."""
    e, h, v, c = (cfg[k] for k in ("hidden_size", "num_attention_heads", "vocab_size",
                                   "kv_lora_rank"))
    dn, dr, dv, q = (cfg[k] for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                                      "q_lora_rank"))
    x, fe, s, f = (cfg[k] for k in ("n_routed_experts", "moe_intermediate_size",
                                    "n_shared_experts", "intermediate_size"))
    dk = dn + dr
    t = {"token_embd.weight": [e, v], "output_norm.weight": [e], "output.weight": [e, v]}
    for i in range(cfg["num_hidden_layers"]):
        b = f"blk.{i}."
        layer = {"attn_norm": [e], "attn_kv_a_mqa": [e, c + dr], "attn_kv_a_norm": [c],
                 "attn_output": [h * dv, e], "ffn_norm": [e]}
        layer.update({"attn_q_a": [e, q], "attn_q_a_norm": [q], "attn_q_b": [q, h * dk]} if q
                     else {"attn_q": [e, h * dk]})
        layer.update({"attn_k_b": [dn, c, h], "attn_v_b": [c, dv, h]} if layout == "mla"
                     else {"attn_kv_b": [c, h * (dn + dv)]})
        if i < cfg["first_k_dense_replace"]:
            layer.update({"ffn_gate": [e, f], "ffn_up": [e, f], "ffn_down": [f, e]})
        else:
            layer.update({"ffn_gate_inp": [e, x], "ffn_gate_exps": [e, fe, x],
                          "ffn_up_exps": [e, fe, x], "ffn_down_exps": [fe, e, x],
                          "ffn_gate_shexp": [e, fe * s], "ffn_up_shexp": [e, fe * s],
                          "ffn_down_shexp": [fe * s, e]})
        t.update({f"{b}{k}.weight": ne for k, ne in layer.items()})
    return t


@pytest.mark.parametrize("preset", ["lite", "full"])
@pytest.mark.parametrize("layout", ["mla", "legacy"])
def test_tensor_names_and_ne_shapes_match_reference_table(built, preset, layout):
    got = {t.name: [int(n) for n in t.shape] for t in built[preset, layout].tensors}
    assert got == ne_table(preset_config(preset), layout)


@pytest.mark.parametrize("layout", ["mla", "legacy"])
def test_norms_1d_and_router_are_f32_rest_requested_type(built, layout):
    for t in built["full", layout].tensors:
        f32 = len(t.shape) == 1 or t.name.endswith("_norm.weight") or "ffn_gate_inp" in t.name
        assert t.tensor_type == (QT.F32 if f32 else QT.BF16), t.name


def expected_metadata(cfg: dict, layout: str) -> dict[str, tuple[VT, object]]:
    a, mla = "deepseek2.", layout == "mla"
    c, dn, dr, dv = (cfg[k] for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                                      "v_head_dim"))
    u32 = VT.UINT32
    md = {"general.architecture": (VT.STRING, "deepseek2"), "general.type": (VT.STRING, "model"),
          "general.file_type": (u32, 32), "general.quantization_version": (u32, 2),
          a + "block_count": (u32, cfg["num_hidden_layers"]),
          a + "context_length": (u32, cfg["max_position_embeddings"]),
          a + "embedding_length": (u32, cfg["hidden_size"]),
          a + "feed_forward_length": (u32, cfg["intermediate_size"]),
          a + "attention.head_count": (u32, cfg["num_attention_heads"]),
          a + "attention.head_count_kv": (u32, 1 if mla else cfg["num_attention_heads"]),
          a + "rope.freq_base": (VT.FLOAT32, 10000.0),
          a + "attention.layer_norm_rms_epsilon": (VT.FLOAT32, pytest.approx(1e-6)),
          a + "rope.scaling.type": (VT.STRING, "yarn"),
          a + "rope.scaling.factor": (VT.FLOAT32, cfg["rope_scaling"]["factor"]),
          a + "rope.scaling.original_context_length":
              (u32, cfg["rope_scaling"]["original_max_position_embeddings"]),
          a + "rope.scaling.yarn_beta_fast": (VT.FLOAT32, 32.0),
          a + "rope.scaling.yarn_beta_slow": (VT.FLOAT32, 1.0),
          a + "rope.scaling.yarn_log_multiplier":
              (VT.FLOAT32, pytest.approx(0.1 * cfg["rope_scaling"]["mscale_all_dim"])),
          a + "rope.dimension_count": (u32, dr),
          a + "expert_count": (u32, cfg["n_routed_experts"]),
          a + "expert_used_count": (u32, cfg["num_experts_per_tok"]),
          a + "expert_shared_count": (u32, cfg["n_shared_experts"]),
          a + "expert_feed_forward_length": (u32, cfg["moe_intermediate_size"]),
          a + "expert_group_count": (u32, cfg["n_group"]),
          a + "expert_group_used_count": (u32, cfg["topk_group"]),
          a + "expert_gating_func": (u32, 1),
          a + "expert_weights_scale": (VT.FLOAT32, cfg["routed_scaling_factor"]),
          a + "expert_weights_norm": (VT.BOOL, False),
          a + "leading_dense_block_count": (u32, cfg["first_k_dense_replace"]),
          a + "vocab_size": (u32, cfg["vocab_size"]),
          a + "attention.kv_lora_rank": (u32, c),
          a + "attention.key_length": (u32, c + dr if mla else dn + dr),
          a + "attention.value_length": (u32, c if mla else dv)}
    if mla:
        md[a + "attention.key_length_mla"] = (u32, dn + dr)
        md[a + "attention.value_length_mla"] = (u32, dv)
    if cfg["q_lora_rank"]:
        md[a + "attention.q_lora_rank"] = (u32, cfg["q_lora_rank"])
    return md


@pytest.mark.parametrize("preset", ["lite", "full"])
@pytest.mark.parametrize("layout", ["mla", "legacy"])
def test_metadata_keys_types_and_values(built, preset, layout):
    fields = {k: f for k, f in built[preset, layout].fields.items()
              if not k.startswith(("GGUF.", "tokenizer.", "general.name"))}
    want = expected_metadata(preset_config(preset), layout)
    assert set(fields) == set(want)
    for key, (vtype, value) in want.items():
        assert fields[key].types == [vtype], key
        assert fields[key].contents() == value, key


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = build_model(tmp_path / "a.gguf", preset="lite", seed=3, num_hidden_layers=2)
    b = build_model(tmp_path / "b.gguf", preset="lite", seed=3, num_hidden_layers=2)
    c = build_model(tmp_path / "c.gguf", preset="lite", seed=4, num_hidden_layers=2)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_builtin_vocab_is_self_consistent():
    v = builtin_vocab(1024)
    tokens, types = v["tokenizer.ggml.tokens"], v["tokenizer.ggml.token_type"]
    ids = {t: i for i, t in enumerate(tokens)}
    assert len(tokens) == len(types) == len(ids) == 1024
    bos, eos = v["tokenizer.ggml.bos_token_id"], v["tokenizer.ggml.eos_token_id"]
    assert tokens[bos] == "<｜begin▁of▁sentence｜>" and tokens[eos] == "<｜end▁of▁sentence｜>"
    assert types[bos] == types[eos] == gguf.TokenType.CONTROL
    assert 0 <= v["tokenizer.ggml.padding_token_id"] < len(tokens)
    assert all(types[i] == gguf.TokenType.UNUSED for i, t in enumerate(tokens) if t[:4] == "[PAD")
    merges = v["tokenizer.ggml.merges"]
    assert len(merges) >= 200
    for m in merges:  # both halves and their concatenation are tokens
        left, right = m.split(" ")
        assert left in ids and right in ids and left + right in ids, m
    assert v["tokenizer.ggml.add_bos_token"] is True and v["tokenizer.ggml.add_eos_token"] is False
    assert v["tokenizer.chat_template"] == CHAT_TEMPLATE


def test_builtin_vocab_round_trips_through_gguf(built):
    fields = built["lite", "mla"].fields
    got = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.")}
    assert got == builtin_vocab(preset_config("lite")["vocab_size"])
    assert fields["tokenizer.ggml.bos_token_id"].types == [VT.UINT32]
    assert fields["tokenizer.ggml.token_type"].types == [VT.ARRAY, VT.INT32]


@pytest.mark.skipif(not VOCAB_GGUF.is_file(), reason=f"fixture {VOCAB_GGUF} not present")
def test_vocab_from_gguf_copies_the_real_deepseek_tokenizer():
    # reference values: tests/data/README.md (parsing the file twice would double a slow read)
    v = vocab_from_gguf(VOCAB_GGUF)
    assert len(v["tokenizer.ggml.tokens"]) == len(v["tokenizer.ggml.token_type"]) == 102400
    assert len(v["tokenizer.ggml.merges"]) == 99757
    assert (v["tokenizer.ggml.model"], v["tokenizer.ggml.pre"]) == ("gpt2", "deepseek-llm")
    assert (v["tokenizer.ggml.bos_token_id"], v["tokenizer.ggml.eos_token_id"]) == (100000, 100001)
    assert v["tokenizer.ggml.tokens"][100000] == "<｜begin▁of▁sentence｜>"
    assert v["tokenizer.ggml.add_bos_token"] is True
    assert v["tokenizer.chat_template"] == CHAT_TEMPLATE  # the file has none; ours filled in


def test_cli_writes_requested_file_and_prints_path(tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    assert main(["-o", str(out), "--preset", "lite", "--layers", "2", "--ftype", "q8_0",
                 "--layout", "legacy", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    fields = gguf.GGUFReader(out).fields
    assert fields["deepseek2.block_count"].contents() == 2
    assert fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


def test_cli_q4_k_m_build_has_planned_types_and_close_weights(tmp_path):
    out = tmp_path / "q4km.gguf"  # tiny: rows of 256 and 128, so K-quants and fallbacks
    assert main(["-o", str(out), "--preset", "tiny", "--layers", "3", "--ftype", "q4_k_m"]) == 0
    r = gguf.GGUFReader(out)
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
    cfg = preset_config("tiny", num_hidden_layers=3)
    shapes = [(t.name, tuple(int(n) for n in reversed(t.shape))) for t in r.tensors]
    want = plan_types(shapes, "q4_k_m", 3, cfg["n_routed_experts"])
    got = {t.name: t.tensor_type for t in r.tensors}
    assert got == want
    assert {QT.Q4_K, QT.Q6_K, QT.Q5_0, QT.Q8_0, QT.F32} <= set(got.values())
    weights = random_weights(cfg, seed=0)
    tensors = {t.name: t for t in r.tensors}
    for name, hf, bound in [("token_embd.weight", "model.embed_tokens.weight", 0.08),
                            ("output.weight", "lm_head.weight", 0.02),
                            ("blk.2.ffn_down_shexp.weight",
                             "model.layers.2.mlp.shared_experts.down_proj.weight", 0.02),
                            ("blk.1.attn_k_b.weight", None, 0.05)]:
        t = tensors[name]
        y = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        if hf is None:  # Q5_0 fallback (rows of 32): MLA's per-head split of kv_b
            dn, dv = cfg["qk_nope_head_dim"], cfg["v_head_dim"]
            kv_b = weights["model.layers.1.self_attn.kv_b_proj.weight"]
            ref = kv_b.view(cfg["num_attention_heads"], dn + dv, -1)[:, :dn].transpose(1, 2)
        else:
            ref = weights[hf]
        err = ((y - ref) ** 2).mean().sqrt() / (ref**2).mean().sqrt()
        assert err <= bound, (name, t.tensor_type.name, float(err))


def test_random_weights_load_into_hf_and_give_spread_logits():
    transformers = pytest.importorskip("transformers", reason="HF reference needs transformers")
    cfg = preset_config("full")
    weights = random_weights(cfg, seed=0)
    sd = {}
    for name in weights:  # HF 5.x keeps routed experts as fused 3-D parameters
        if ".experts." not in name:
            sd[name] = weights[name]
    fe = cfg["moe_intermediate_size"]
    for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        ex = f"model.layers.{i}.mlp.experts"
        per = [[weights[f"{ex}.{j}.{w}_proj.weight"] for j in range(cfg["n_routed_experts"])]
               for w in ("gate", "up", "down")]
        sd[f"{ex}.gate_up_proj"] = torch.cat([torch.stack(per[0]), torch.stack(per[1])], 1)
        sd[f"{ex}.down_proj"] = torch.stack(per[2])
        assert sd[f"{ex}.gate_up_proj"].shape[1] == 2 * fe
    keep = set(transformers.DeepseekV2Config().to_dict()) | set(cfg)
    model = transformers.DeepseekV2ForCausalLM(
        transformers.DeepseekV2Config(**{k: v for k, v in cfg.items() if k in keep}))
    model.load_state_dict(sd, strict=True)
    ids = torch.arange(2, 34).unsqueeze(0)
    with torch.no_grad():
        logits = model(ids).logits[0]
    assert torch.isfinite(logits).all()
    assert 0.3 < logits.std(-1).mean().item() < 30
    assert logits.argmax(-1).unique().numel() > 4  # positions disagree: not a constant output
