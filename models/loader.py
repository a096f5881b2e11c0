"""Open a GGUF file and build the model this process (or rank) should hold."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from gguf import GGMLQuantizationType as QT

from llama_mpi.models.config import ModelConfig, config_from_metadata
from llama_mpi.models.deepseek_v2 import DeepseekV2, RuntimeOptions
from llama_mpi.models.gguf.gguf_file import GGUFFile
from llama_mpi.models.host_allocator import keep_freed_memory

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def weight_type(gf: GGUFFile, num_layers: int) -> QT:
    """The type of the file's bulk weights (the stacked experts, else the attention output)."""
    for name in ("blk.{}.ffn_down_exps.weight", "blk.0.attn_output.weight"):
        for i in range(num_layers):
            info = gf.tensors.get(name.format(i))
            if info is not None:
                return info.qtype
    return QT.F32


def compute_dtype(requested: str, gf: GGUFFile, cfg: ModelConfig, device: torch.device
                  ) -> torch.dtype:
    """``auto`` follows the file: F32 -> float32, BF16 -> bfloat16, F16 -> float16 where the
    device is fast at it (else float32), quantized -> bfloat16."""
    if requested != "auto":
        try:
            return DTYPES[requested]
        except KeyError:
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, not "
                             f"{requested!r}") from None
    qt = weight_type(gf, cfg.num_layers)
    if qt == QT.F32:
        return torch.float32
    if qt == QT.F16:
        return torch.float16 if device.type in ("cuda", "npu") else torch.float32
    return torch.bfloat16


def open_model_file(path: str | Path, group_scoring: str = "auto", use_mmap: bool = True
                    ) -> tuple[GGUFFile, ModelConfig]:
    gf = GGUFFile(path, use_mmap=use_mmap)
    cfg = config_from_metadata(gf.metadata, set(gf.tensors), str(gf.path), group_scoring)
    return gf, cfg


def load_model(path: str | Path, dtype: str = "auto", group_scoring: str = "auto",
               use_mmap: bool = True, **options: Any) -> DeepseekV2:
    """Load the model (or this rank's shard of it); ``options`` go to ``RuntimeOptions``.

    Also tunes this process's host allocator for step-sized temporaries (host_allocator)."""
    t0 = time.perf_counter()
    keep_freed_memory()
    gf, cfg = open_model_file(path, group_scoring, use_mmap)
    device = torch.device(options.get("device", "cpu"))
    opts = RuntimeOptions(dtype=compute_dtype(dtype, gf, cfg, device), use_mmap=use_mmap,
                          **options)
    model = DeepseekV2.from_gguf(gf, cfg, opts)
    log.info("loaded %s (%d layers, %s) in %.2f s", gf.path.name, cfg.num_layers,
             str(opts.dtype).removeprefix("torch."), time.perf_counter() - t0)
    return model
