"""Fused decode (one native call per layer) against the eager torch path on random models.

Every case prefills three sequences of different lengths together (eager: 38 rows), then
decodes greedily: all three together, then one alone; logits of every step and the greedy
tokens are compared with the eager model on the same file. The fused path mirrors the eager
path's roundings, so float32 agrees to float32 summation order and bf16 / quantized files
(bf16 compute, int8 activations) agree to a bf16 ulp here and there (measured: identical
logits on most of these files, 4e-3 max abs on bf16 naive MLA).
"""

from __future__ import annotations

import logging

import pytest
import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.fused_decode import FusedDecoder
from llama_mpi.models.kernels import quant_kernels
from llama_mpi.models.loader import load_model

from .conftest import SEQS

pytestmark = pytest.mark.skipif(not quant_kernels.available(),
                                reason="the fused decode needs the C kernels")
BLOCK = 4
CASES = [("lite", "f32", "mla"), ("full", "f32", "legacy"), ("full", "bf16", "mla"),
         ("lite", "bf16", "legacy"), ("full", "q8_0", "mla"), ("lite", "q4_0", "mla"),
         ("quant", "q4_k_m", "mla")]


class Run:
    """Prefill ``seqs`` together, then greedy decode steps; records logits and tokens."""

    def __init__(self, model, seqs: list[list[int]], extra: int) -> None:
        self.model, self.seqs = model, [list(s) for s in seqs]
        self.tables, nxt = [], 0
        for s in seqs:  # reversed block ids: addressing goes through the table
            n = -(-(len(s) + extra) // BLOCK)
            self.tables.append(list(range(nxt, nxt + n))[::-1])
            nxt += n
        self.pool = model.make_kv_pool(nxt, BLOCK)
        self.logits: list[torch.Tensor] = []
        out = model(ForwardBatch.build([(s, 0, t) for s, t in zip(self.seqs, self.tables,
                                                                     strict=True)], BLOCK),
                    self.pool)
        self._append(range(len(seqs)), out)

    def _append(self, which, out: torch.Tensor) -> None:
        self.logits.append(out)
        for row, b in enumerate(which):
            self.seqs[b].append(int(out[row].argmax()))

    def step(self, which: list[int]) -> None:
        batch = ForwardBatch.build([([self.seqs[b][-1]], len(self.seqs[b]) - 1, self.tables[b])
                                    for b in which], BLOCK)
        self._append(which, self.model(batch, self.pool))


def decode(path, fused: bool, absorbed: bool = True, **opts) -> Run:
    model = load_model(path, fused_decode=fused, absorbed_mla=absorbed, **opts)
    run = Run(model, SEQS, extra=12)
    for _ in range(5):
        run.step([0, 1, 2])
    for _ in range(3):
        run.step([1])
    run.step([2, 0])
    return run


def count_calls(model) -> list[int]:
    """Wraps the model's fused layer call (built on first use) with a counter."""
    calls = [0]
    dec = model.fused_decoder()
    assert isinstance(dec, FusedDecoder)
    raw = dec.call

    def counted(*a):
        calls[0] += 1
        return raw(*a)

    dec.call = counted
    return calls


def compare(got: Run, want: Run, ftype: str) -> None:
    assert got.seqs == want.seqs  # the same greedy text
    for g, w in zip(got.logits, want.logits, strict=True):
        if ftype == "f32":
            assert (g - w).abs().max().item() <= 1e-4
        else:
            assert ((g - w).norm() / w.norm()).item() <= 1e-2


@pytest.mark.parametrize("absorbed", [True, False], ids=["absorbed", "naive"])
@pytest.mark.parametrize("variant,ftype,layout", CASES)
def test_fused_decode_matches_eager(reference, variant, ftype, layout, absorbed):
    _, path = reference(variant, ftype, layout)
    want = decode(path, False, absorbed)
    model = load_model(path, fused_decode=True, absorbed_mla=absorbed)
    calls = count_calls(model)
    run = Run(model, SEQS, extra=12)
    assert calls[0] == 0  # 38-row prefill: eager
    for _ in range(5):
        run.step([0, 1, 2])
    for _ in range(3):
        run.step([1])
    run.step([2, 0])
    assert calls[0] == 9 * model.cfg.num_layers  # every decode step fused, one call a layer
    compare(run, want, ftype)


@pytest.mark.parametrize("chunks", [False, True])
def test_short_prefill_chunks(reference, chunks):
    """Prefill chunks stay eager by default; with ``chunks`` on, a batch of a few multi-token
    chunks (<= 16 rows) runs fused, causal within each."""
    _, path = reference("full", "bf16", "mla")
    outs = []
    for fused in (False, True):
        model = load_model(path, fused_decode=fused)
        calls = count_calls(model) if fused else [0]
        if fused:
            model.fused_decoder().chunks = chunks
        pool = model.make_kv_pool(12, BLOCK)
        batch = ForwardBatch.build([(SEQS[0][:5], 0, [0, 1]), (SEQS[1][:7], 0, [5, 4])], BLOCK,
                                   all_logits=True)
        outs.append(model(batch, pool))
        nxt = ForwardBatch.build([(SEQS[0][5:9], 5, [0, 1, 2]), ([3], 7, [5, 4])], BLOCK,
                                 all_logits=True)
        outs.append(model(nxt, pool))
        assert calls[0] == (2 * model.cfg.num_layers if fused and chunks else 0)
    for g, w in zip(outs[2:], outs[:2], strict=True):
        assert ((g - w).norm() / w.norm()).item() <= 1e-2
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize("ftype", ["f32", "q8_0"])
def test_v3_style_router(reference, ftype):
    """Sigmoid scores, a selection bias, groups ranked by their best two, normalised and
    scaled weights (DeepSeek-V3's router), on the fused path as on the eager one."""
    _, path = reference("full", ftype, "mla")

    def v3(model):
        g = torch.Generator().manual_seed(3)
        for block in model.blocks:
            r = getattr(block.ffn, "router", None)
            if r is not None:
                r.sigmoid, r.top2sum, r.normalize, r.scale = True, True, True, 2.5
                r.bias = torch.randn(r.weight.shape[0], generator=g) * 0.1
        return model

    runs = []
    for fused in (False, True):
        model = v3(load_model(path, fused_decode=fused))
        run = Run(model, SEQS, extra=6)
        for _ in range(4):
            run.step([0, 1, 2])
        runs.append(run)
    compare(runs[1], runs[0], ftype)


def test_falls_back_with_one_log_line(reference, caplog):
    _, path = reference("lite", "f32", "mla")
    with caplog.at_level(logging.INFO, logger="llama_mpi.models.fused_decode"):
        model = load_model(path, dtype="float16")
        run = Run(model, SEQS, extra=4)
        run.step([0, 1, 2])
        run.step([0])
    assert model.fused_decoder() is None
    lines = [r for r in caplog.records if "fused decode off" in r.getMessage()]
    assert len(lines) == 1 and "float16" in lines[0].getMessage()

    model = load_model(path, quant_backend="torch")  # f32 file: dense, fused still applies
    assert FusedDecoder.build(model) is not None
    model = load_model(path, fused_decode=False)
    Run(model, SEQS, extra=1).step([0])
    assert not model._fused_built  # never built


def test_torch_quant_backend_falls_back(reference):
    _, path = reference("full", "q8_0", "mla")
    model = load_model(path, quant_backend="torch", dtype="float32")
    assert FusedDecoder.build(model) is None


def test_fused_toggle_gives_the_same_text(reference):
    _, path = reference("full", "q8_0", "mla")
    model = load_model(path)
    texts = []
    for on in (True, False, True):
        model.fused_decode = on
        run = Run(model, SEQS[:2], extra=6)
        for _ in range(5):
            run.step([0, 1])
        texts.append(run.seqs)
    assert texts[0] == texts[1] == texts[2]


def test_graph_mode_on_and_off_give_the_same_text(reference):
    _, path = reference("full", "bf16", "mla")
    texts = []
    for mode, fused in (("off", False), ("on", False), ("on", True), ("off", True)):
        model = load_model(path, graph_mode=mode, fused_decode=fused)
        run = Run(model, SEQS, extra=6)
        for _ in range(5):
            run.step([0, 1, 2])
        texts.append(run.seqs)
        assert isinstance(model._fused, FusedDecoder) == (mode == "on" or fused)
    assert all(t == texts[0] for t in texts)
    with pytest.raises(ValueError, match="graph_mode"):
        load_model(path, graph_mode="sometimes")


def test_layer_split_decodes_fused(reference):
    """Layers on two CPU "devices" (layer split): one fused call per layer, the same text."""
    from llama_mpi.parallel.layer_split import plan_layers

    _, path = reference("full", "f32", "mla")
    want = decode(path, False)
    plan = plan_layers(3, "cpu", 2, tensor_split=[1, 2])
    model = load_model(path, layer_devices=plan.torch_devices())
    calls = count_calls(model)
    run = Run(model, SEQS, extra=12)
    for _ in range(5):
        run.step([0, 1, 2])
    for _ in range(3):
        run.step([1])
    run.step([2, 0])
    assert calls[0] == 9 * model.cfg.num_layers
    compare(run, want, "f32")
