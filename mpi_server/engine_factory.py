"""Build the serving stack for one configuration: model, tokenizer, chat template, engine.

``llama-server`` calls ``build_engine`` in a worker thread while the HTTP server already
answers ``/health`` with 503; ``llama-mpi-server`` passes an executor that drives all ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from llama_mpi.models.loader import load_model
from llama_mpi.models.tensor_walk import check_finite
from llama_mpi.models.tokenizer.chat_template import ChatTemplate, encode_chat
from llama_mpi.models.tokenizer.tokenizer import Tokenizer
from llama_mpi.mpi_server.config import ServerConfig
from llama_mpi.mpi_server.engine.async_engine import AsyncEngine
from llama_mpi.mpi_server.engine.engine import Engine, EngineConfig
from llama_mpi.mpi_server.engine.executor import ModelExecutor
from llama_mpi.mpi_server.engine.local_executor import LocalExecutor
from llama_mpi.mpi_server.settings import engine_options, model_options

if TYPE_CHECKING:  # at run time imported in ChatEncoder, as compiler_for is
    from llama_mpi.mpi_server.structured.compiler import GrammarCompiler

log = logging.getLogger(__name__)

ChatToIds = Callable[[list[dict[str, Any]]], list[int]]


def pool_geometry(config: ServerConfig, model_context: int) -> tuple[int, int, int]:
    """(num_blocks, block_size, max_model_len): the pool holds ``n_ctx`` tokens shared by all
    slots; one sequence may use all of it, up to the model's trained context."""
    block = config.kv_block_size
    num_blocks = -(-config.n_ctx // block)
    return num_blocks, block, min(config.n_ctx, model_context)


def layer_devices(config: ServerConfig) -> list[torch.device] | None:
    from llama_mpi.parallel.device import auto_device_type, device_count
    from llama_mpi.parallel.layer_split import plan_layers

    dev_type = auto_device_type() if config.device == "auto" else config.device
    if dev_type == "cpu":
        n_dev = max(1, len(config.tensor_split))  # CPU "devices" so that plans can be tested
    else:
        n_dev = device_count(dev_type)
    if n_dev == 1 and dev_type == "cpu":
        return None
    from llama_mpi.models.loader import open_model_file

    n_layers = open_model_file(config.model, config.moe_group_scoring)[1].num_layers
    plan = plan_layers(n_layers, dev_type, n_dev, split_mode=config.split_mode,
                       tensor_split=config.tensor_split, n_gpu_layers=config.n_gpu_layers,
                       main_gpu=config.main_gpu)
    log.info("layer split plan: %s", plan.describe())
    return plan.torch_devices()


def check_memory(config: ServerConfig, device: torch.device, tp: int = 1, ep: int = 1,
                 vocab_parallel: bool = False, local_ranks: int = 1) -> None:
    """Refuse, before loading, a model + KV pool that cannot fit the memory this process may
    use (cgroup limit or available RAM), with the estimate and the figures; an accelerator's
    own memory is not checked here."""
    from llama_mpi.models.loader import compute_dtype, open_model_file
    from llama_mpi.models.memory_budget import ensure_fits, gib
    from llama_mpi.models.memory_plan import estimate_load

    if device.type != "cpu":
        return
    gf, cfg = open_model_file(config.model, config.moe_group_scoring)
    num_blocks, block, _ = pool_geometry(config, cfg.max_position_embeddings)
    est = estimate_load(gf, cfg, compute_dtype(config.dtype, gf, cfg, device),
                        config.quant_backend != "dequantize", num_blocks * block, tp, ep,
                        vocab_parallel, local_ranks, config.use_mmap)
    limit, source = ensure_fits(est, config.model)
    ranks = f" for {local_ranks} ranks on this machine" if local_ranks > 1 else ""
    log.info("memory estimate%s: %s; this process may use %s (%s)", ranks, est.describe(),
             gib(limit), source)


def log_resident(model: Any) -> None:
    from llama_mpi.models.memory_budget import gib
    from llama_mpi.models.memory_resident import describe_resident

    policy = model.policy
    log.info("weights: %s mapped from the file, %s copied; %s", gib(policy.mapped_bytes),
             gib(policy.copied_bytes), describe_resident())


def ensure_builtin_model(config: ServerConfig) -> None:
    """The quick start's built-in model is built on first use (a few seconds)."""
    from pathlib import Path

    from llama_mpi.models.gguf.builder import default_model_path, ensure_model

    if Path(config.model) == default_model_path() and not Path(config.model).is_file():
        log.info("building the built-in model at %s", config.model)
        ensure_model(config.model)


class ChatEncoder:
    """``chat_to_ids``: messages (and OpenAI ``tools``) -> prompt ids through the chat template.

    Also carries what the HTTP layer needs to know about the model for structured outputs:
    ``tool_syntax`` (the template's DeepSeek tool-call form, "v3" / "v31", or None when it
    renders no tool calls) and ``compiler``, the model's one grammar compiler and cache.
    """

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate) -> None:
        from llama_mpi.mpi_server.structured import compiler_for, detect_tool_syntax

        self.tokenizer, self.template = tokenizer, template
        self.tool_syntax = detect_tool_syntax(template.source)
        self.compiler: GrammarCompiler | None
        try:
            self.compiler = compiler_for(tokenizer)  # builds the grammar vocabulary now, once
        except ValueError as exc:  # a vocabulary without EOS: constraints could never end
            log.warning("structured outputs are unavailable: %s", exc)
            self.compiler = None

    def __call__(self, messages: list[dict[str, Any]],
                 tools: list[dict[str, Any]] | None = None) -> list[int]:
        return encode_chat(self.tokenizer, self.template, messages, tools=tools)


def build_tokenizer(config: ServerConfig) -> tuple[Tokenizer, ChatToIds]:
    ensure_builtin_model(config)
    tokenizer = Tokenizer.from_gguf(config.model)
    # compiled now: a broken template is a start-up error (ChatTemplateLoadError, a ValueError)
    template = ChatTemplate.resolve(tokenizer, config.chat_template)
    log.info("chat template: %s", template.origin)
    return tokenizer, ChatEncoder(tokenizer, template)


def local_executor(config: ServerConfig) -> ModelExecutor:
    if config.n_threads > 0:
        torch.set_num_threads(config.n_threads)
    devices = layer_devices(config)
    check_memory(config, devices[0] if devices else torch.device("cpu"))
    model = load_model(config.model, **model_options(
        config, layer_devices=devices, device=devices[0] if devices else torch.device("cpu")))
    log_resident(model)
    if config.check_tensors:
        check_finite(model)  # every weight: experts, router, norms, embedding, head
    num_blocks, block, max_len = pool_geometry(config, model.cfg.max_position_embeddings)
    return LocalExecutor(model, num_blocks, block, max_len, config.n_threads,
                         config.n_threads_batch)


def build_engine(config: ServerConfig, executor: ModelExecutor | None = None,
                 tokenizer: tuple[Tokenizer, ChatToIds] | None = None,
                 ) -> tuple[AsyncEngine, Tokenizer, ChatToIds, int, int]:
    """``tokenizer``: what ``build_tokenizer(config)`` returned, if the caller has it already
    (loading the vocabulary and compiling the template and grammar vocabulary once)."""
    tok, chat_to_ids = tokenizer or build_tokenizer(config)
    executor = executor or local_executor(config)
    ecfg = EngineConfig(**engine_options(config))
    engine = AsyncEngine(Engine(executor, tok, ecfg), config.batch_wait_ms / 1000,
                         step_timeout_s=config.health_step_timeout)
    return engine, tok, chat_to_ids, executor.vocab_size, engine.max_model_len
