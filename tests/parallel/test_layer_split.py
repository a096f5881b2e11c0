"""The layer-split plan, and a model split over two CPU "devices" matching one device."""

from __future__ import annotations

import torch

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.loader import load_model
from llama_mpi.parallel.layer_split import plan_layers, split_counts


def test_split_counts_follow_tensor_split():
    assert split_counts(27, [1, 1]) == [14, 13]
    assert split_counts(60, [3, 1]) == [45, 15]
    assert split_counts(4, [0, 1]) == [0, 4]


def test_layers_past_n_gpu_layers_stay_on_cpu():
    plan = plan_layers(6, "cuda", 2, n_gpu_layers=4)
    assert plan.devices == ["cpu", "cpu", "cuda:0", "cuda:0", "cuda:1", "cuda:1"]


def test_split_mode_none_uses_main_gpu_only():
    plan = plan_layers(4, "npu", 3, split_mode="none", main_gpu=2)
    assert set(plan.devices) == {"npu:2"}


def test_layer_split_over_two_cpu_devices_equals_single_device(tmp_path):
    from llama_mpi.models.gguf.builder import build_model

    path = build_model(tmp_path / "tiny.gguf", preset="tiny", ftype="f32", seed=3)
    plan = plan_layers(4, "cpu", 2, tensor_split=[1, 3])
    assert plan.ranges == [("cpu:0", 0, 1), ("cpu:1", 1, 4)]
    ids = list(range(10, 40))
    batch = ForwardBatch.build([(ids, 0, [0, 1])], 16, all_logits=True)
    one = load_model(path)
    split = load_model(path, layer_devices=plan.torch_devices())
    want = one(batch, one.make_kv_pool(2, 16))
    got = split(batch, split.make_kv_pool(2, 16))
    assert torch.equal(got, want)
