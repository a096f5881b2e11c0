"""Every component's settings, derived from ``ServerConfig`` in one place.

The model loader, the engine and the HTTP app each take their own small set of options;
writing them out by hand at every caller (two servers, the benchmarks) is how they drifted
before. Callers add only what depends on where they run (devices, a rank's shard, its
communicator).
"""

from __future__ import annotations

import os
from typing import Any

from llama_mpi.mpi_server.config import ServerConfig


def model_options(config: ServerConfig, **where: Any) -> dict[str, Any]:
    """Keyword arguments for ``load_model(config.model, **...)``; ``where`` adds the device,
    layer devices, shard, communicators of this process."""
    return {
        "dtype": config.dtype,
        "group_scoring": config.moe_group_scoring,
        "use_mmap": config.use_mmap,
        "absorbed_mla": config.enable_mla,
        "quant_backend": config.quant_backend,
        "fused_moe": config.enable_fused_moe,
        "fused_decode": config.fused_decode,
        "graph_mode": config.graph_mode,
        **where,
    }


def engine_options(config: ServerConfig) -> dict[str, Any]:
    """Keyword arguments for ``EngineConfig``."""
    return {
        "n_parallel": config.n_parallel,
        "n_batch": config.n_batch,
        "max_queue": config.max_queue,
        "cont_batching": config.cont_batching,
        "enable_prefix_caching": config.prefix_caching,
        "no_perf": config.no_perf,
        "presample_count": config.presample_count,
    }


def model_names(config: ServerConfig) -> tuple[str, tuple[str, ...]]:
    """The name the API serves (``model_alias``, else the file name) and the other names a
    client may use for it (path, file name, stem)."""
    path = config.model
    base = os.path.basename(path)
    stem = base[:-5] if base.endswith(".gguf") else base
    name = config.model_alias or base or "llama-mpi"
    return name, tuple(n for n in (path, base, stem) if n)


def http_options(config: ServerConfig) -> dict[str, Any]:
    """Keyword arguments for ``create_app`` (everything but the engine and tokenizer)."""
    name, aliases = model_names(config)
    return {
        "model_name": name,
        "model_aliases": aliases,
        "api_key": config.api_key,
        "display_chat": config.display_chat,
        "no_perf": config.no_perf,
        "max_model_len": config.n_ctx,
        "special": config.special,
        "max_request_bytes": config.max_request_bytes,
        "strict_model_name": config.strict_model_name,
        "reasoning_format": config.reasoning_format,
    }
