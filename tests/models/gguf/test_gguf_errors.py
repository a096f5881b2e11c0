"""Each kind of bad model file gives an error that names the file and what is wrong."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from llama_mpi.models.gguf.gguf_file import GGUFError
from llama_mpi.models.loader import load_model

QT = gguf.GGMLQuantizationType


def rewrite(src: Path, dst: Path, *, drop: str = "", metadata: dict | None = None,
            retype: tuple[str, QT] | None = None, drop_key: str = "") -> Path:
    """Copy a GGUF with gguf-py, dropping a tensor or key, overriding metadata or retyping."""
    reader = gguf.GGUFReader(src)
    metadata = metadata or {}
    writer = gguf.GGUFWriter(dst, arch=str(metadata.get("general.architecture", "deepseek2")))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", drop_key):
            continue
        value = metadata.get(key, field.contents())
        sub = field.types[1] if len(field.types) > 1 else None
        vtype = gguf.GGUFValueType.STRING if isinstance(value, str) else field.types[0]
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for t in reader.tensors:
        if t.name == drop:
            continue
        raw = np.array(t.data)
        qtype = t.tensor_type
        if retype and t.name == retype[0]:
            qtype, raw = retype[1], raw.view(np.int32)
        writer.add_tensor(t.name, raw, raw_shape=raw.shape if qtype == t.tensor_type else None,
                          raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


@pytest.fixture()
def good(reference) -> Path:
    return reference("lite", "f32", "mla")[1]


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is not a model\n")
    with pytest.raises(GGUFError, match=r"notes\.gguf: not a GGUF file"):
        load_model(bad)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(GGUFError, match=r"empty\.gguf"):
        load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(GGUFError, match=r"nowhere\.gguf: no such file"):
        load_model(tmp_path / "nowhere.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(good, tmp_path, keep):
    data = good.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFError, match=r"cut\.gguf: .*truncated"):
        load_model(bad)


def test_truncated_header(good, tmp_path):
    bad = tmp_path / "head.gguf"
    bad.write_bytes(good.read_bytes()[:200])
    with pytest.raises(GGUFError, match=r"head\.gguf: truncated"):
        load_model(bad)


def test_other_architecture(good, tmp_path):
    bad = rewrite(good, tmp_path / "llama.gguf", metadata={"general.architecture": "llama"})
    with pytest.raises(ValueError, match=r"llama\.gguf: architecture 'llama' is not supported"):
        load_model(bad)


def test_missing_tensor(good, tmp_path):
    bad = rewrite(good, tmp_path / "hole.gguf", drop="blk.1.attn_output.weight")
    with pytest.raises(GGUFError, match=r"hole\.gguf: missing tensor 'blk\.1\.attn_output"):
        load_model(bad)


def test_shape_disagrees_with_metadata(good, tmp_path):
    bad = rewrite(good, tmp_path / "shape.gguf",
                  metadata={"deepseek2.expert_feed_forward_length": 48})
    with pytest.raises(GGUFError, match=r"shape\.gguf: tensor 'blk\.\d+\.[\w.]+' has shape "
                       r"\[.*\] but the metadata implies"):
        load_model(bad)


@pytest.mark.parametrize("key", ["deepseek2.expert_count", "deepseek2.block_count",
                                 "deepseek2.rope.freq_base"])
def test_a_metadata_value_of_the_wrong_type_names_file_and_key(good, tmp_path, key):
    bad = rewrite(good, tmp_path / "typed.gguf", metadata={key: "sixty-four"})
    with pytest.raises(ValueError, match=rf"typed\.gguf: metadata key '{key}' must be (an "
                       rf"integer|a finite number), got 'sixty-four'"):
        load_model(bad)


def test_unsupported_tensor_type(good, tmp_path):
    bad = rewrite(good, tmp_path / "i32.gguf", retype=("blk.0.attn_norm.weight", QT.I32))
    with pytest.raises(GGUFError, match=r"i32\.gguf: tensor 'blk\.0\.attn_norm\.weight' has "
                       r"type I32"):
        load_model(bad)


def test_missing_required_metadata(good, tmp_path):
    bad = rewrite(good, tmp_path / "nokv.gguf", drop_key="deepseek2.attention.kv_lora_rank")
    with pytest.raises(ValueError, match=r"nokv\.gguf: missing metadata key "
                       r"'deepseek2\.attention\.kv_lora_rank'"):
        load_model(bad)
