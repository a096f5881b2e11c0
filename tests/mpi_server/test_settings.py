"""Settings derived once from ``ServerConfig``: each component gets every key it takes."""

from __future__ import annotations

import dataclasses
import inspect

from llama_mpi.models.deepseek_v2 import RuntimeOptions
from llama_mpi.models.loader import load_model
from llama_mpi.mpi_server.config import ServerConfig
from llama_mpi.mpi_server.engine.engine import EngineConfig
from llama_mpi.mpi_server.http import create_app
from llama_mpi.mpi_server.settings import engine_options, http_options, model_options


def test_model_options_are_what_the_loader_takes() -> None:
    taken = set(inspect.signature(load_model).parameters) | {
        f.name for f in dataclasses.fields(RuntimeOptions)}
    opts = model_options(ServerConfig(enable_mla=False, fused_decode=False, graph_mode="on"))
    assert set(opts) <= taken
    assert opts["absorbed_mla"] is False and opts["fused_decode"] is False
    assert opts["graph_mode"] == "on"


def test_engine_options_fill_the_engine_config() -> None:
    cfg = EngineConfig(**engine_options(ServerConfig(n_parallel=3, prefix_caching=False)))
    assert cfg.n_parallel == 3 and cfg.enable_prefix_caching is False


def test_http_options_are_what_the_app_takes() -> None:
    params = set(inspect.signature(create_app).parameters)
    opts = http_options(ServerConfig(model="/m/DeepSeek-V2-Lite.gguf", strict_model_name=True))
    assert set(opts) <= params
    assert opts["model_name"] == "DeepSeek-V2-Lite.gguf"
    assert opts["model_aliases"] == ("/m/DeepSeek-V2-Lite.gguf", "DeepSeek-V2-Lite.gguf",
                                     "DeepSeek-V2-Lite")
    assert opts["strict_model_name"] is True
    assert http_options(ServerConfig(model_alias="x"))["model_name"] == "x"
