"""Configuration: YAML file + llama.cpp-style flags -> checked ServerConfig."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from pathlib import Path

import pytest

from llama_mpi.mpi_server.cli_args import parse_cli
from llama_mpi.mpi_server.config import ConfigError, ServerConfig, describe_keys, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEED_KEYS = (
    "main_gpu n_gpu_layers split_mode tensor_split use_mmap use_mlock check_tensors n_threads "
    "n_threads_batch defrag_thold no_perf enable_mla enable_fused_moe offload_input enable_ge "
    "display_chat presample_count n_ctx n_batch n_parallel model model_alias special "
    "cont_batching reranking port n_threads_http hostname chat_template"
).split()


def write(tmp_path: Path, text: str, name: str = "x.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_every_seed_key_is_a_field() -> None:
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    assert set(SEED_KEYS) <= names


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(str(path))
    assert "~" not in cfg.model


def test_shipped_configs_present() -> None:
    names = {p.name for p in CONFIGS.glob("*.yaml")}
    assert {
        "default.yaml",
        "config_deepseek_v2_lite.yaml",
        "config_deepseek_v2_lite_ep.yaml",
        "config_deepseek_v2.yaml",
    } <= names


def test_default_yaml_matches_builtin_defaults() -> None:
    assert load_config(str(CONFIGS / "default.yaml")) == load_config(None)


def test_default_model_path_is_expanded() -> None:
    cfg = load_config(None)
    assert cfg.model == os.path.expanduser("~/.cache/llama-mpi/tiny-deepseek2.gguf")
    assert (cfg.port, cfg.hostname, cfg.n_parallel) == (8080, "127.0.0.1", 4)


def test_layer_split_config_has_eight_shares() -> None:
    cfg = load_config(str(CONFIGS / "config_deepseek_v2.yaml"))
    assert cfg.split_mode == "layer" and len(cfg.tensor_split) == 8


def test_ep_config_uses_alltoall() -> None:
    assert load_config(str(CONFIGS / "config_deepseek_v2_lite_ep.yaml")).moe_comm == "alltoall"


def test_file_values_are_applied(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "n_ctx: 1024\ntensor_split: [3, 1]\ncollective_timeout: 5\n"))
    assert cfg.n_ctx == 1024 and cfg.tensor_split == (3.0, 1.0)
    assert cfg.collective_timeout == 5.0 and isinstance(cfg.collective_timeout, float)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "# nothing\n")) == load_config(None)


def test_out_of_range_value_names_file_key_and_value(tmp_path: Path) -> None:
    path = write(tmp_path, "n_ctx: -5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: n_ctx: must be a positive integer, got -5"


@pytest.mark.parametrize(
    "text",
    [
        "port: 70000",
        "port: '8080'",
        "use_mmap: 1",
        "n_ctx: true",
        "dtype: fp8",
        "tensor_split: [1, -1]",
        "tensor_split: [0, 0]",
        "presample_count: 0",
        "hostname: ''",
        "collective_timeout: 0",
        "collective_timeout: .inf",
        "batch_wait_ms: .inf",  # once killed the engine thread at the first request
        "batch_wait_ms: .nan",
        "batch_wait_ms: 1e400",
        "heartbeat_timeout: 0",
        "health_step_timeout: -1",
        "tensor_split: [1, .inf]",
        "defrag_thold: .nan",
        "max_request_bytes: -1",
        "strict_model_name: 1",
        "hostname: not a host",
    ],
)
def test_bad_values_are_rejected(tmp_path: Path, text: str) -> None:
    key = text.split(":")[0]
    with pytest.raises(ConfigError, match=f": {key}: "):
        load_config(write(tmp_path, text + "\n"))


def test_an_unresolvable_hostname_names_the_key_at_start_up(tmp_path: Path) -> None:
    path = write(tmp_path, 'hostname: "not a host"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: hostname: must be an address or a host name this "
                              "machine can resolve, got 'not a host'")


def test_resolvable_hostnames_are_accepted(tmp_path: Path) -> None:
    for host in ("localhost", "0.0.0.0", "::1"):
        assert load_config(write(tmp_path, f'hostname: "{host}"\n')).hostname == host


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "n_ctxx: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}: unknown key 'n_ctxx' (did you mean 'n_ctx'?)"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "n_ctx: 10\nport: [1, 2\nhostname: x\n")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: invalid YAML"):
        load_config(path)


def test_duplicate_key_is_rejected_with_line(tmp_path: Path) -> None:
    path = write(tmp_path, "n_ctx: 10\nport: 1\nn_ctx: 20\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: invalid YAML: duplicate key 'n_ctx'"):
        load_config(path)


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- n_ctx\n- 10\n"))


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))


def test_enable_ge_without_npu_warns_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed, so enable_ge is not inert here")
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, "enable_ge: true\n"))
    msgs = [r.getMessage() for r in caplog.records if "enable_ge" in r.getMessage()]
    assert msgs == ["enable_ge: GE graph capture needs an Ascend NPU with torch_npu; on this "
                    "machine it means graph_mode: on (CPU: the fused native decode layers)"]


def test_enable_ge_is_graph_mode_on(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "enable_ge: true\n")).graph_mode == "on"
    assert load_config(None).graph_mode == "off"
    assert load_config(write(tmp_path, "graph_mode: on\nfused_decode: false\n")).graph_mode == "on"


@pytest.mark.parametrize("text", ["reranking: true", "use_mlock: true", "defrag_thold: 0.1"])
def test_inert_keys_warn_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, text: str):
    key = text.split(":")[0]
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, text + "\n"))
    msgs = [r.getMessage() for r in caplog.records if r.getMessage().startswith(key)]
    assert len(msgs) == 1 and "\n" not in msgs[0] and "ignored" in msgs[0]


def test_defaults_log_no_warnings(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        load_config(None)
    assert caplog.records == []


def test_check_tensors_is_accepted_silently(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert load_config(write(tmp_path, "check_tensors: true\n")).check_tensors is True
    assert caplog.records == []


def test_flags_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, "n_ctx: 1024\nport: 9000\nn_parallel: 2\n")
    cfg = load_config(path, ["-c", "2048", "--port", "9001"])
    assert (cfg.n_ctx, cfg.port, cfg.n_parallel) == (2048, 9001, 2)


def test_config_flag_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "n_ctx: 1234\n")
    assert load_config(None, ["--config", path]).n_ctx == 1234


def test_multi_letter_single_dash_flags() -> None:
    argv = ["-np", "3", "-ngl", "-1", "-tb", "2", "-ts", "3,1", "-mg", "1", "-m", "/x.gguf"]
    cfg = load_config(None, argv)
    assert cfg.n_parallel == 3 and cfg.n_gpu_layers == -1 and cfg.n_threads_batch == 2
    assert cfg.tensor_split == (3.0, 1.0) and cfg.main_gpu == 1 and cfg.model == "/x.gguf"


def test_long_flags_and_switches() -> None:
    argv = [
        "--ctx-size=512", "--parallel", "2", "--batch-size", "64", "--threads", "2",
        "--host", "0.0.0.0", "--api-key", "123", "--alias", "tiny", "--no-mmap", "--mlock",
        "--dtype", "float32", "--chat-template", "{{ x }}",
    ]  # fmt: skip
    cfg = load_config(None, argv)
    assert (cfg.n_ctx, cfg.n_parallel, cfg.n_batch, cfg.n_threads) == (512, 2, 64, 2)
    assert (cfg.hostname, cfg.api_key, cfg.model_alias) == ("0.0.0.0", "123", "tiny")
    assert cfg.use_mmap is False and cfg.use_mlock is True
    assert cfg.dtype == "float32" and cfg.chat_template == "{{ x }}"


def test_flag_values_are_validated() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["--ctx-size", "-5"])
    assert str(err.value) == "command line --ctx-size: n_ctx: must be a positive integer, got -5"


def test_non_numeric_flag_value_is_rejected() -> None:
    with pytest.raises(ConfigError, match="n_parallel: must be a positive integer, got 'x'"):
        load_config(None, ["-np", "x"])


def test_unknown_flag_is_config_error() -> None:
    with pytest.raises(ConfigError, match="unrecognized arguments"):
        load_config(None, ["--ctx-sise", "5"])


def test_parse_cli_returns_only_given_flags() -> None:
    cli = parse_cli(["-c", "10"])
    assert cli.config_path is None and cli.overrides == {"n_ctx": ("--ctx-size", 10)}


def test_describe_keys_covers_every_field() -> None:
    rows = describe_keys()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(ServerConfig)]
    assert all(isinstance(doc, str) and doc for _, _, _, doc in rows)
    assert ("n_ctx", "int", 4096) == rows[[r[0] for r in rows].index("n_ctx")][:3]


def test_reasoning_format_key_and_flag(tmp_path: Path) -> None:
    assert ServerConfig().reasoning_format == "none"
    assert load_config(None, ["--reasoning-format", "deepseek"]).reasoning_format == "deepseek"
    f = tmp_path / "c.yaml"
    f.write_text("reasoning_format: deepseek\n")
    assert load_config(str(f)).reasoning_format == "deepseek"
    with pytest.raises(ConfigError, match="reasoning_format: must be one of 'none', 'deepseek'"):
        load_config(None, ["--reasoning-format", "r1"])
