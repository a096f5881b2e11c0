"""llama.cpp-style command-line flags that override the YAML configuration.

Multi-letter single-dash flags (``-np``, ``-ngl``, ``-tb``, ``-ts``, ``-mg``) are registered as
option strings in their own right; argparse matches an exact option string before it tries to
split ``-np`` into ``-n p``, and ``allow_abbrev=False`` stops ``--po`` meaning ``--port``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from llama_mpi.mpi_server.config import ConfigError, coerce_text

# (option strings, config key, help); every one of these takes a value
_VALUE_FLAGS: list[tuple[tuple[str, ...], str, str]] = [
    (("-m", "--model"), "model", "GGUF model path"),
    (("-a", "--alias"), "model_alias", "model name served by the API"),
    (("-c", "--ctx-size"), "n_ctx", "context window per sequence"),
    (("-np", "--parallel"), "n_parallel", "sequences decoded at once"),
    (("-b", "--batch-size"), "n_batch", "most prompt tokens per forward step"),
    (("-t", "--threads"), "n_threads", "CPU threads for decode (-1 all)"),
    (("-tb", "--threads-batch"), "n_threads_batch", "CPU threads for prefill"),
    (("--host",), "hostname", "address to bind"),
    (("--port",), "port", "HTTP port"),
    (("--api-key",), "api_key", "Bearer token the API requires"),
    (("-ngl", "--n-gpu-layers", "--gpu-layers"), "n_gpu_layers", "layers on the accelerator"),
    (("-ts", "--tensor-split"), "tensor_split", "per-device shares, e.g. 3,1"),
    (("-mg", "--main-gpu"), "main_gpu", "device index of the unsplit model"),
    (("--dtype",), "dtype", "auto|float32|bfloat16|float16"),
    (("--device",), "device", "auto|cpu|cuda|npu"),
    (("--chat-template",), "chat_template", "Jinja chat template text"),
    (("--reasoning-format",), "reasoning_format", "none|deepseek: <think> text to "
     "reasoning_content"),
]

# (option string, config key, value stored when the flag is present)
_SWITCH_FLAGS: list[tuple[str, str, bool]] = [
    ("--no-mmap", "use_mmap", False),
    ("--mlock", "use_mlock", True),
    ("--verbose", "verbose", True),
    ("-v", "verbose", True),
    ("--strict-model-name", "strict_model_name", True),
]


class _RaisingParser(argparse.ArgumentParser):
    """Report bad flags as ConfigError so callers handle files and flags alike."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"command line: {message}")


@dataclass
class CliArgs:
    config_path: str | None = None
    # config key -> (flag as typed, value): the flag is kept for error messages
    overrides: dict[str, tuple[str, Any]] = field(default_factory=dict)


def build_parser(prog: str = "llama-server") -> argparse.ArgumentParser:
    parser = _RaisingParser(
        prog=prog, allow_abbrev=False, description="Serve a DeepSeek-V2 GGUF model over HTTP."
    )
    parser.add_argument("--config", dest="config_path", default=None, help="YAML config file")
    for opts, key, help_text in _VALUE_FLAGS:
        parser.add_argument(
            *opts, dest=key, default=argparse.SUPPRESS, metavar=key.upper(), help=help_text
        )
    for opt, key, value in _SWITCH_FLAGS:
        parser.add_argument(
            opt, dest=key, action="store_const", const=value, default=argparse.SUPPRESS
        )
    return parser


def _flag_name(key: str) -> str:
    for opts, k, _ in _VALUE_FLAGS:
        if k == key:
            return next(o for o in opts if o.startswith("--"))  # the long name reads best
    return next(opt for opt, k, _ in _SWITCH_FLAGS if k == key)


def parse_cli(argv: list[str]) -> CliArgs:
    """Parse ``argv`` (without the program name) into a config path and key overrides.

    Values come back typed by the config key (``"-5"`` -> ``-5``) but unchecked:
    ``config.apply_values`` checks them exactly as it checks the YAML file's values.
    """
    ns = vars(build_parser().parse_args(argv))
    out = CliArgs(config_path=ns.pop("config_path"))
    for key, value in ns.items():
        if isinstance(value, str):
            value = coerce_text(key, value)
        out.overrides[key] = (_flag_name(key), value)
    return out
