"""Paths of the fixture files kept in the repository (see tests/data/README.md)."""

from __future__ import annotations

from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
DEEPSEEK_VOCAB = DATA / "ggml-vocab-deepseek-llm.gguf"
