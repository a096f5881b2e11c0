"""Shared fixtures: transformers reference models and their GGUF conversions (cached per
session, since several tests compare against the same files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llama_mpi.models.forward_batch import ForwardBatch
from llama_mpi.models.gguf.hf_to_gguf import convert
from tests.fixtures import DEEPSEEK_VOCAB

from .hf_reference import hf_model

VOCAB = DEEPSEEK_VOCAB  # kept in the repository: tests/data/README.md
DATA = VOCAB.parent
MISSING_VOCAB = ("needs tests/data/ggml-vocab-deepseek-llm.gguf (llama.cpp's test vectors), "
                 f"not found at {VOCAB}")


@pytest.fixture(scope="module")
def real():
    """The real DeepSeek-V2 vocabulary (a read-only fixture beside the repository)."""
    from llama_mpi.models.tokenizer.tokenizer import Tokenizer

    if not VOCAB.exists():
        pytest.skip(MISSING_VOCAB)
    return Tokenizer.from_gguf(VOCAB)


# three sequences of different lengths, reused across tests
SEQS = [[5, 17, 250, 3, 99, 41, 7, 300, 12, 64, 1, 2, 3, 200, 150, 77, 8, 9],
        [11, 22, 33, 44, 55, 66, 77],
        [310, 1, 140, 141, 142, 143, 2, 2, 2, 90, 91, 92, 93]]
BLOCK = 4


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def reference(gguf_dir: Path):
    """``reference(variant, ftype, layout) -> (hf_model, gguf_path)``, built once each."""
    cache: dict[tuple[str, str, str], tuple[object, Path]] = {}
    models: dict[str, object] = {}

    def get(variant: str, ftype: str = "f32", layout: str = "mla"):
        key = (variant, ftype, layout)
        if key not in cache:
            model = models.setdefault(variant, hf_model(variant))
            path = gguf_dir / f"{variant}-{ftype}-{layout}.gguf"
            convert(model.state_dict(), model.config.to_dict(), path, ftype=ftype,
                    layout=layout)
            cache[key] = (model, path)
        return cache[key]

    return get


def batch_for(seqs: list[list[int]], all_logits: bool = True) -> ForwardBatch:
    """All sequences prefilled together, with deliberately scattered, interleaved blocks."""
    next_block = 0
    tables = [[] for _ in seqs]
    for step in range(max(len(s) for s in seqs)):
        for i, s in enumerate(seqs):
            if step < len(s) and step % BLOCK == 0:
                tables[i].append(next_block)
                next_block += 1
    entries = [(s, 0, tables[i]) for i, s in enumerate(seqs)]
    return ForwardBatch.build(entries, BLOCK, all_logits=all_logits)


def num_blocks(seqs: list[list[int]], extra: int = 0) -> int:
    return sum(-(-(len(s) + extra) // BLOCK) for s in seqs) + 1

