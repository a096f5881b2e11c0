"""Server configuration: the original llama-server's flat YAML keys plus our own.

Precedence is built-in defaults < YAML file < command-line flags (see ``cli_args``). Every
value is checked for type and range, so a typo or a bad value fails at start-up with the file
and key named, not deep inside the engine.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import yaml

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file or flag that cannot be used; the message names where and why."""


# (predicate, message) pairs: the message is shown for a wrong type as well as a bad range.
_POSITIVE = (lambda v: v > 0, "must be a positive integer")
_NONNEG = (lambda v: v >= 0, "must be a non-negative integer")
_AUTO_OR_POS = (lambda v: v == -1 or v > 0, "must be -1 (auto) or a positive integer")
_OFF_OR_POS = (lambda v: v == -1 or v > 0, "must be -1 (off) or a positive integer")
_ALL_OR_NONNEG = (lambda v: v >= -1, "must be -1 (all layers) or a non-negative integer")
_PORT = (lambda v: 0 <= v <= 65535, "must be an integer in [0, 65535]")
_TIMEOUT = (lambda v: 0 < v <= 86400, "must be a number of seconds in (0, 86400]")
_BATCH_WAIT = (lambda v: 0 <= v <= 10000, "must be a number of milliseconds in [0, 10000]")
_DEFRAG = (lambda v: v == -1 or 0 <= v <= 1, "must be -1 (off) or a number in [0, 1]")
_NONEMPTY = (lambda v: v != "", "must be a non-empty string")
_NONEMPTY_OR_NULL = (lambda v: v is None or v != "", "must be a non-empty string or null")


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return True


# Resolved when the value is set, so a typo fails at start-up naming the key, not at bind.
_HOST = (lambda v: v != "" and _resolves(v), "must be an address or a host name this machine "
         "can resolve")

_KIND_TEXT = {
    "bool": "must be true or false",
    "int": "must be an integer",
    "float": "must be a finite number",
    "str": "must be a string",
    "str?": "must be a string or null",
    "floats": "must be a list of non-negative numbers, not all zero",
}


def _k(default: Any, kind: Any, doc: str, rule: tuple | None = None) -> Any:
    # kind is a _KIND_TEXT key or a tuple of allowed strings
    return field(default=default, metadata={"kind": kind, "doc": doc, "rule": rule})


@dataclass
class ServerConfig:
    # --- keys of the original llama-server (flat YAML) ---
    main_gpu: int = _k(0, "int", "device index for the first rank / unsplit model", _NONNEG)
    n_gpu_layers: int = _k(-1, "int", "layers placed on the accelerator; -1 all", _ALL_OR_NONNEG)
    split_mode: str = _k("layer", ("none", "layer", "row"), "how layers spread over devices")
    tensor_split: tuple[float, ...] = _k((), "floats", "relative share per device; empty = even")
    use_mmap: bool = _k(True, "bool", "memory-map the GGUF file instead of reading it")
    use_mlock: bool = _k(False, "bool", "lock model pages in RAM (not supported: warns)")
    check_tensors: bool = _k(False, "bool", "verify every tensor is finite while loading")
    n_threads: int = _k(-1, "int", "CPU threads for decode; -1 = cores / local ranks", _AUTO_OR_POS)
    n_threads_batch: int = _k(-1, "int", "CPU threads for prefill; -1 = n_threads", _AUTO_OR_POS)
    defrag_thold: float = _k(-1.0, "float", "KV defrag threshold (paged cache: unused)", _DEFRAG)
    no_perf: bool = _k(False, "bool", "do not collect per-request timing metrics")
    enable_mla: bool = _k(True, "bool", "DeepSeek MLA: cache the compressed latent KV")
    enable_fused_moe: bool = _k(True, "bool", "sort tokens by expert, one pass per layer")
    offload_input: bool = _k(True, "bool", "place input embeddings on the device (always)")
    enable_ge: bool = _k(False, "bool", "Ascend GE graph mode: the same as graph_mode: on")
    display_chat: bool = _k(False, "bool", "log each chat request and reply")
    presample_count: int = _k(-1, "int", "top-k candidates kept before sampling", _OFF_OR_POS)
    n_ctx: int = _k(4096, "int", "KV pool size in tokens, shared by all slots", _POSITIVE)
    n_batch: int = _k(2048, "int", "most prompt tokens in one forward step", _POSITIVE)
    n_parallel: int = _k(4, "int", "sequences decoded at once (slots)", _POSITIVE)
    model: str = _k("~/.cache/llama-mpi/tiny-deepseek2.gguf", "str", "GGUF model path", _NONEMPTY)
    model_alias: str | None = _k(None, "str?", "model name served by the API", _NONEMPTY_OR_NULL)
    special: bool = _k(False, "bool", "render special tokens in output text")
    cont_batching: bool = _k(True, "bool", "admit new sequences between decode steps")
    reranking: bool = _k(False, "bool", "rerank endpoint (not provided: warns)")
    port: int = _k(8080, "int", "HTTP port; 0 picks a free one", _PORT)
    n_threads_http: int = _k(-1, "int", "HTTP threads (asyncio loop: unused)", _AUTO_OR_POS)
    hostname: str = _k("127.0.0.1", "str", "address the HTTP server binds", _HOST)
    chat_template: str | None = _k(None, "str?", "Jinja chat template; null = the GGUF's")
    # --- keys of this runtime ---
    api_key: str | None = _k(None, "str?", "Bearer token required by the API", _NONEMPTY_OR_NULL)
    dtype: str = _k("auto", ("auto", "float32", "bfloat16", "float16"), "compute dtype")
    quant_backend: str = _k("auto", ("auto", "native", "torch", "dequantize"),
                            "quantized weights: C kernels on the blocks (native), torch "
                            "dequantization per tile (torch), or dense at load (dequantize)")
    device: str = _k("auto", ("auto", "cpu", "cuda", "npu"), "compute device")
    moe_comm: str = _k("alltoall", ("alltoall", "allreduce"), "expert-parallel exchange")
    moe_group_scoring: str = _k("auto", ("auto", "max", "top2sum"), "MoE group-limited routing")
    comm_backend: str = _k("auto", ("auto", "mpi", "gloo", "nccl", "hccl"), "collectives backend")
    collective_timeout: float = _k(300.0, "float", "seconds before a collective fails", _TIMEOUT)
    heartbeat_timeout: float = _k(10.0, "float", "MPI: seconds without a heartbeat from a rank "
                                  "(stopped, hung or gone) before the job is ended", _TIMEOUT)
    health_step_timeout: float = _k(120.0, "float", "/health answers 503 while one step has run "
                                    "longer than this (a hung rank or collective)", _TIMEOUT)
    fused_decode: bool = _k(True, "bool", "CPU: each decode layer (up to 16 rows) as one native "
                            "call; false = the eager torch path")
    graph_mode: str = _k("off", ("off", "on"), "decode graphs: on a CPU the fused native layers "
                         "(even with fused_decode false); CUDA graphs / GE not written: eager")
    kv_block_size: int = _k(16, "int", "tokens per paged KV block", _POSITIVE)
    max_queue: int = _k(256, "int", "waiting requests before HTTP 503", _POSITIVE)
    vocab_parallel: bool = _k(True, "bool", "split the LM head over ranks (MPI; measured faster)")
    prefix_caching: bool = _k(True, "bool", "reuse KV blocks of shared prompt prefixes")
    batch_wait_ms: float = _k(2.0, "float", "when idle, wait for a burst of requests to end "
                              "(this long without a new one, at most 10x) before the first "
                              "step; 0 = start at once", _BATCH_WAIT)
    max_request_bytes: int = _k(0, "int", "largest HTTP request body (413 beyond); 0 = auto: "
                                "max(4 MiB, 64 bytes x n_ctx)", _NONNEG)
    strict_model_name: bool = _k(False, "bool", "answer 404 for a `model` other than the one "
                                 "served (default: serve it anyway, as llama.cpp does)")
    reasoning_format: str = _k("none", ("none", "deepseek"), "deepseek: the reply's leading "
                               "think block goes to reasoning_content, the rest to content "
                               "(llama.cpp's flag)")
    verbose: bool = _k(False, "bool", "debug logging, and tracebacks for start-up errors")


_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}


def _describe_kind(kind: Any) -> str:
    if isinstance(kind, tuple):
        return "|".join(kind)
    return {"str?": "str|null", "floats": "list[float]"}.get(kind, kind)


def describe_keys() -> list[tuple[str, str, Any, str]]:
    """``(key, type, default, doc)`` for every key, in declaration order (for the README)."""
    defaults = ServerConfig()
    return [
        (name, _describe_kind(f.metadata["kind"]), getattr(defaults, name), f.metadata["doc"])
        for name, f in _FIELDS.items()
    ]


def _is_finite_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int beyond float range
        return False


def check_value(key: str, value: Any) -> Any:
    """Return ``value`` normalised for ``key``; raise ``ValueError(why)`` if it does not fit."""
    kind, rule = _FIELDS[key].metadata["kind"], _FIELDS[key].metadata["rule"]
    why = rule[1] if rule else _KIND_TEXT.get(kind, "")
    if isinstance(kind, tuple):
        if isinstance(value, bool) and {"on", "off"} <= set(kind):  # YAML 1.1 reads on as true
            value = "on" if value else "off"
        if value not in kind:
            raise ValueError("must be one of " + ", ".join(repr(c) for c in kind))
        return value
    if kind == "floats":
        if isinstance(value, str):  # "3,1" as llama.cpp's -ts takes it
            value = [p for p in value.replace(" ", "").split(",") if p]
        if not isinstance(value, (list, tuple)):
            raise ValueError(why)
        try:
            out = tuple(float(v) for v in value if not isinstance(v, bool))
        except (TypeError, ValueError, OverflowError):
            raise ValueError(why) from None
        if len(out) != len(value) or any(not math.isfinite(v) or v < 0 for v in out) or (
                out and not any(out)):
            raise ValueError(why)
        return out
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": _is_finite_number(value),
        "str": isinstance(value, str),
        "str?": value is None or isinstance(value, str),
    }[kind]
    if not ok or (rule and not rule[0](value)):
        raise ValueError(why)
    return float(value) if kind == "float" else value


def coerce_text(key: str, text: str) -> Any:
    """Turn a flag's text into the key's type; text that does not parse is left for check."""
    kind = _FIELDS[key].metadata["kind"]
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        return text
    return text


def _unknown_key_message(source: str, key: Any) -> str:
    close = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"{source}: unknown key '{key}'{hint}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice (PyYAML would silently keep the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> dict[str, Any]:
    """The file's mapping (``{}`` for an empty file); ConfigError naming file and line."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_StrictLoader)  # noqa: S506 - safe loader subclass
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of key: value, got {type(data).__name__}")
    return data


def apply_values(cfg: ServerConfig, values: dict[str, Any], source: str) -> None:
    """Check and set each value on ``cfg``; errors read ``<source>: <key>: <why>, got <v>``."""
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(_unknown_key_message(source, key))
        try:
            setattr(cfg, key, check_value(key, value))
        except ValueError as exc:
            raise ConfigError(f"{source}: {key}: {exc}, got {value!r}") from None


def warn_inert_keys(cfg: ServerConfig) -> list[str]:
    """Log (one line each) and return warnings for keys set to something that cannot act here."""
    notes = []
    if cfg.enable_ge and importlib.util.find_spec("torch_npu") is None:
        notes.append("enable_ge: GE graph capture needs an Ascend NPU with torch_npu; on this "
                     "machine it means graph_mode: on (CPU: the fused native decode layers)")
    if cfg.reranking:
        notes.append("reranking: this server has no rerank endpoint; ignored")
    if cfg.use_mlock:
        notes.append("use_mlock: weights live in torch tensors that are not page-locked; ignored")
    if cfg.defrag_thold >= 0:
        notes.append("defrag_thold: the paged KV cache never fragments; ignored")
    if not cfg.offload_input:
        notes.append("offload_input: inputs always go to the model's device; false ignored")
    if cfg.n_threads_http != -1:
        notes.append("n_threads_http: HTTP runs on one asyncio event loop; ignored")
    for note in notes:
        log.warning(note)
    return notes


def load_config(path: str | None, argv: list[str] | None = None) -> ServerConfig:
    """Defaults, then the YAML file at ``path`` (or ``--config`` in ``argv``), then flags."""
    from llama_mpi.mpi_server.cli_args import parse_cli  # cli_args imports this module

    cli = parse_cli(argv) if argv is not None else None
    if cli is not None and cli.config_path is not None:
        path = cli.config_path  # the flag names the file the caller meant to load
    cfg = ServerConfig()
    if path is not None:
        apply_values(cfg, read_yaml(path), path)
    if cli is not None:
        for key, (flag, value) in cli.overrides.items():
            apply_values(cfg, {key: value}, f"command line {flag}")
    cfg.model = os.path.expanduser(cfg.model)
    if cfg.enable_ge:  # the seed's key for graph mode: one setting, derived here
        cfg.graph_mode = "on"
    warn_inert_keys(cfg)
    return cfg
