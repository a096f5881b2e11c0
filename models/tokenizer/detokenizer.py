"""Token ids back to text, the way llama.cpp's `token_to_piece` + `detokenize` do it.

Every token maps to a fixed byte string (its "piece"); text is the UTF-8 decoding of the
concatenated pieces, with invalid or truncated sequences shown as U+FFFD. Because pieces only
concatenate (no space cleanup for the DeepSeek pre-tokenizers), streaming is a byte-level
incremental UTF-8 decode: O(piece length) per token, holding back an incomplete character.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

# GGUF `tokenizer.ggml.token_type` values.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL = 1, 2, 3
TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 4, 5, 6


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


# str.translate table: byte-level character -> the character whose code point is the byte.
_UNBYTE = {ord(ch): b for b, ch in gpt2_byte_alphabet().items()}


def byte_level_to_bytes(token: str) -> bytes:
    """Undo the GPT-2 byte alphabet. Characters outside it (malformed vocab) stay as UTF-8."""
    mapped = token.translate(_UNBYTE)
    try:
        return mapped.encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(
            ch.encode("latin-1") if ord(ch) < 256 else ch.encode("utf-8") for ch in mapped
        )


def build_piece_tables(
    tokens: Sequence[str], token_types: Sequence[int]
) -> tuple[list[bytes], list[bytes]]:
    """(pieces with special tokens rendered, pieces with them as b"") per llama.cpp BPE rules.

    NORMAL tokens are byte-level decoded; CONTROL/UNKNOWN print their raw text only when
    special tokens are rendered; USER_DEFINED always print raw text; UNUSED and BYTE print
    nothing (llama.cpp suppresses unsupported types in BPE vocabularies).
    """
    with_special: list[bytes] = []
    without_special: list[bytes] = []
    for token, kind in zip(tokens, token_types, strict=True):
        if kind == TOKEN_NORMAL:
            piece = byte_level_to_bytes(token)
            with_special.append(piece)
            without_special.append(piece)
        elif kind == TOKEN_USER_DEFINED:
            piece = token.encode("utf-8", "replace")
            with_special.append(piece)
            without_special.append(piece)
        elif kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            with_special.append(token.encode("utf-8", "replace"))
            without_special.append(b"")
        else:
            with_special.append(b"")
            without_special.append(b"")
    return with_special, without_special


class IncrementalDetokenizer:
    """Streams text for one sequence of generated ids.

    `add` returns only the new text. The pieces returned so far are always a prefix of
    `tokenizer.decode(ids_so_far)`; what is missing is at most a trailing incomplete UTF-8
    character (shown as U+FFFD by `decode`), which `add` holds back until the next bytes
    complete it or `flush` gives up on it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._pieces = tokenizer.piece_table(skip_special_tokens)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chunks: list[str] = []
        self._text_cache = ""
        self._cached_chunks = 0

    def add(self, token_id: int) -> str:
        if token_id < 0 or token_id >= len(self._pieces):
            raise ValueError(f"token id {token_id} outside the vocabulary ({len(self._pieces)})")
        new = self._decoder.decode(self._pieces[token_id])
        if new:
            self._chunks.append(new)
        return new

    def flush(self) -> str:
        """End of sequence: emit U+FFFD for a held-back incomplete character, if any."""
        new = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        if new:
            self._chunks.append(new)
        return new

    @property
    def text(self) -> str:
        """All text returned so far by `add` and `flush`."""
        if self._cached_chunks != len(self._chunks):
            self._text_cache = "".join(self._chunks)
            self._cached_chunks = len(self._chunks)
        return self._text_cache

    @property
    def pending_bytes(self) -> bytes:
        """Bytes of an incomplete character held back (at most 3)."""
        return self._decoder.getstate()[0]
