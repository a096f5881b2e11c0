"""Layer split without MPI (``llama-server``): contiguous layer ranges per device.

Like llama.cpp's ``split_mode: layer``: ``tensor_split`` gives each visible device a share
of the layers (even when empty), ``n_gpu_layers`` caps how many layers leave the CPU (the
first ``num_layers - n_gpu_layers`` stay on the CPU, as llama.cpp offloads the last ones),
and ``main_gpu`` is the only device used when ``split_mode`` is ``none``. On a CPU-only
machine the same plan is honoured over CPU "devices", so it can be tested here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPlan:
    devices: list[str]  # per layer; strings, since "npu" parses only once torch_npu is in
    ranges: list[tuple[str, int, int]]  # (device label, first layer, end layer) for the log

    def torch_devices(self) -> list[torch.device]:
        return [torch.device(d) for d in self.devices]

    def describe(self) -> str:
        return ", ".join(f"{d}: layers {a}-{b - 1}" for d, a, b in self.ranges if b > a)


def split_counts(num_layers: int, shares: Sequence[float]) -> list[int]:
    """Layer counts proportional to ``shares`` (llama.cpp's cumulative-fraction rounding)."""
    total = float(sum(shares))
    if total <= 0 or any(s < 0 for s in shares):
        raise ValueError(
            f"tensor_split must hold non-negative numbers with a positive sum, got {list(shares)}"
        )
    counts, acc, prev = [], 0.0, 0
    for s in shares:
        acc += s
        end = round(num_layers * acc / total)
        counts.append(end - prev)
        prev = end
    return counts


def plan_layers(
    num_layers: int,
    device_type: str,
    n_devices: int,
    *,
    split_mode: str = "layer",
    tensor_split: Sequence[float] = (),
    n_gpu_layers: int = -1,
    main_gpu: int = 0,
) -> LayerPlan:
    if n_devices < 1:
        raise ValueError(f"no {device_type} devices are visible")
    if not 0 <= main_gpu < n_devices:
        raise ValueError(f"main_gpu {main_gpu} is not among the {n_devices} visible devices")
    if split_mode == "row":
        raise ValueError(
            "split_mode 'row' is not supported by llama-server; use 'layer', or "
            "llama-mpi-server for tensor parallelism"
        )
    offload = num_layers if n_gpu_layers < 0 else min(n_gpu_layers, num_layers)
    if split_mode == "none" or n_devices == 1:
        shares: list[float] = [0.0] * n_devices
        shares[main_gpu] = 1.0
    else:
        shares = list(tensor_split) if tensor_split else [1.0] * n_devices
        if len(shares) > n_devices:
            raise ValueError(
                f"tensor_split has {len(shares)} entries but only {n_devices} "
                f"{device_type} devices are visible"
            )
        shares += [0.0] * (n_devices - len(shares))

    def dev(i: int) -> str:
        return device_type if device_type == "cpu" else f"{device_type}:{i}"

    counts = split_counts(offload, shares) if offload else [0] * n_devices
    devices = ["cpu"] * (num_layers - offload)
    ranges = [("cpu", 0, num_layers - offload)] if offload < num_layers else []
    start = num_layers - offload
    for i, n in enumerate(counts):
        devices += [dev(i)] * n
        ranges.append((f"{device_type}:{i}", start, start + n))
        start += n
    plan = LayerPlan(devices, ranges)
    log.info("layer split: %s", plan.describe())
    return plan
