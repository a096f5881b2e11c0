"""Streaming detokenization vs full decoding and Python's own UTF-8 decoder."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_mpi.models.tokenizer.detokenizer import IncrementalDetokenizer
from llama_mpi.models.tokenizer.tokenizer import Tokenizer

AWKWARD = list("😶‍🌫️🦙🚀你好세계ё\u0301\u0308\x00\x1b\r\n\t 　～ø\ud800\udfff")
TEXT = st.text(
    st.one_of(st.sampled_from(AWKWARD), st.characters(exclude_categories=[])), max_size=40
)


@pytest.fixture(scope="module")
def bytes_only() -> Tokenizer:
    """256 GPT-2 byte tokens, no merges: every id is exactly one byte of UTF-8."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": [alphabet[b] for b in range(256)],
        "tokenizer.ggml.merges": [],
    })


def check_every_prefix(tok: Tokenizer, ids: list[int], skip_special: bool = True) -> None:
    """After each id, streamed text is decode(prefix) minus only held-back U+FFFD."""
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip_special)
    streamed = ""
    for k, token_id in enumerate(ids, start=1):
        piece = det.add(token_id)
        streamed += piece
        full = tok.decode(ids[:k], skip_special_tokens=skip_special)
        assert streamed == det.text and full.startswith(streamed)
        assert set(full[len(streamed):]) <= {"\ufffd"} and len(det.pending_bytes) <= 3
    assert streamed + det.flush() == tok.decode(ids, skip_special_tokens=skip_special)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_stream_equals_decode_for_every_prefix_real(real: Tokenizer, text: str) -> None:
    check_every_prefix(real, real.encode(text))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_stream_equals_decode_for_every_prefix_bytes(bytes_only: Tokenizer, text: str) -> None:
    check_every_prefix(bytes_only, bytes_only.encode(text))


@settings(max_examples=100, deadline=None)
@given(data=st.lists(st.integers(0, 255), max_size=24))
def test_arbitrary_bytes_stream_like_python_utf8_decoder(
    bytes_only: Tokenizer, data: list[int]
) -> None:
    # Invalid and truncated sequences: Python's one-shot decoder is the reference.
    det = IncrementalDetokenizer(bytes_only)
    streamed = "".join(det.add(b) for b in data) + det.flush()
    assert streamed == bytes(data).decode("utf-8", "replace")


def test_emoji_split_over_byte_tokens_never_emits_half(real: Tokenizer) -> None:
    # llama.cpp's vectors: " this is 🦙.cpp" -> these ids; 🦙 spans several byte tokens.
    ids = [437, 317, 12356, 99, 234, 13, 14743]
    assert real.decode(ids) == " this is 🦙.cpp"
    det = IncrementalDetokenizer(real)
    pieces = [det.add(i) for i in ids]
    assert "".join(pieces) == " this is 🦙.cpp"
    assert all("\ufffd" not in p for p in pieces) and "" in pieces


def test_special_tokens_streamed_only_when_not_skipped(real: Tokenizer) -> None:
    ids = [100000, 17464, 1843, 100001]  # BOS "Hello world" EOS (llama.cpp vector ids)
    check_every_prefix(real, ids, skip_special=True)
    check_every_prefix(real, ids, skip_special=False)
    det = IncrementalDetokenizer(real, skip_special_tokens=False)
    streamed = "".join(det.add(i) for i in ids)
    assert streamed == "<｜begin▁of▁sentence｜>Hello world<｜end▁of▁sentence｜>"
