"""Byte-level BPE tokenizer rebuilt from GGUF `tokenizer.ggml.*` metadata, matching llama.cpp.

Encoding runs in the HF `tokenizers` library: BPE from the GGUF tokens and merges, llama.cpp's
pre-tokenizer regexes (pretokenizers.py), CONTROL tokens as special added tokens (matched only
when `parse_special`), USER_DEFINED tokens as plain added tokens (always matched, like
llama.cpp). Decoding uses llama.cpp's per-token byte pieces (detokenizer.py).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Sequence
from os import PathLike
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from llama_mpi.models.gguf.gguf_file import read_metadata

from .detokenizer import (
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    build_piece_tables,
)
from .pretokenizers import build_pre_tokenizer

_SURROGATES = re.compile("[\ud800-\udfff]")
# decoded GGUF values by key (str, int, float, bool, or lists of them), as read_metadata gives
Fields = dict[str, Any]


def read_tokenizer_fields(path: str | PathLike[str]) -> Fields:
    """The `tokenizer.*` key/values of a GGUF file (without reading any tensor data)."""
    return {k: v for k, v in read_metadata(path).items() if k.startswith("tokenizer.")}


class Tokenizer:
    """A GGUF vocabulary: `encode`/`decode` identical to llama.cpp's tokenizer."""

    def __init__(self, fields: Fields, source: str) -> None:
        model = fields.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(f"tokenizer.ggml.model {model!r} in {source}: only 'gpt2' (BPE)")
        tokens = [str(t) for t in _required(fields, "tokenizer.ggml.tokens", source)]
        types = [int(t) for t in fields.get("tokenizer.ggml.token_type") or []]
        types = types or [TOKEN_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise ValueError(f"{source}: {len(types)} token types for {len(tokens)} tokens")
        self.source = source
        self.pre = fields.get("tokenizer.ggml.pre")
        pre_tokenizer = build_pre_tokenizer(self.pre, source)  # ValueError if unknown
        self._tokens, self._types = tokens, types
        self._ids = {t: i for i, t in enumerate(tokens)}  # duplicates: last wins, as llama.cpp
        self.bos_id = self._special_id(fields, "bos")
        self.eos_id = self._special_id(fields, "eos")
        self.pad_id = self._special_id(fields, "padding")
        ends = (self.eos_id, self._special_id(fields, "eot"), self._special_id(fields, "eom"))
        self.eos_ids: frozenset[int] = frozenset(i for i in ends if i is not None)
        self.add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
        self.add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", False))
        template = fields.get("tokenizer.chat_template")
        self.chat_template: str | None = str(template) if template else None
        self._backend = self._build_backend(fields, pre_tokenizer)
        self._pieces, self._pieces_no_special = build_piece_tables(tokens, types)
        self._lock = threading.Lock()  # encode toggles a flag on the shared backend

    @classmethod
    def from_gguf(cls, path: str | PathLike[str]) -> Tokenizer:
        return cls(read_tokenizer_fields(path), str(path))

    @classmethod
    def from_metadata(cls, fields: Fields, source: str = "<metadata>") -> Tokenizer:
        return cls(fields, source)

    def _special_id(self, fields: Fields, name: str) -> int | None:
        value = fields.get(f"tokenizer.ggml.{name}_token_id")
        if value is None:
            return None
        if not 0 <= int(value) < len(self._tokens):
            raise ValueError(f"{self.source}: {name}_token_id {value} outside the vocabulary")
        return int(value)

    def _build_backend(self, fields: Fields, pre_tokenizer: pre_tokenizers.PreTokenizer
                       ) -> HFTokenizer:
        merges = []
        for m in fields.get("tokenizer.ggml.merges") or []:
            left, sep, right = str(m).partition(" ")
            if not sep:
                raise ValueError(f"{self.source}: malformed merge {m!r} (want 'left right')")
            merges.append((left, right))
        try:
            bpe = models.BPE(vocab=self._ids, merges=merges, fuse_unk=False, byte_fallback=False)
        except Exception as e:  # tokenizers reports merges naming unknown tokens this way
            raise ValueError(f"{self.source}: cannot build BPE: {e}") from e
        backend = HFTokenizer(bpe)
        backend.pre_tokenizer = pre_tokenizer
        backend.decoder = decoders.ByteLevel()
        added = [
            AddedToken(t, special=k != TOKEN_USER_DEFINED, normalized=False)
            for t, k in zip(self._tokens, self._types, strict=True)
            if t and k in (TOKEN_CONTROL, TOKEN_UNKNOWN, TOKEN_USER_DEFINED)
        ]
        backend.add_tokens(added)
        return backend

    # -- encoding ---------------------------------------------------------------------------

    def encode(
        self, text: str, add_bos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        """Token ids of `text`. `add_bos=None` follows the file's add_bos_token.

        With `parse_special`, control-token text such as `<｜end▁of▁sentence｜>` becomes that
        token; without it, it is tokenized as plain text. Lone surrogates (which UTF-8 cannot
        encode) are replaced by U+FFFD first.
        """
        if _SURROGATES.search(text):
            text = _SURROGATES.sub("\ufffd", text)
        with self._lock:
            self._backend.encode_special_tokens = not parse_special
            ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    # -- decoding ---------------------------------------------------------------------------

    def piece_table(self, skip_special_tokens: bool = True) -> Sequence[bytes]:
        """Per-id bytes that `decode` concatenates (CONTROL tokens b"" when skipping)."""
        return self._pieces_no_special if skip_special_tokens else self._pieces

    def token_to_piece(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        self._check_id(token_id)
        return self.piece_table(skip_special_tokens)[token_id]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= len(self._tokens)):
            raise ValueError(f"token id outside the vocabulary of {len(self._tokens)}: {ids}")
        table = self.piece_table(skip_special_tokens)
        return b"".join([table[i] for i in ids]).decode("utf-8", "replace")

    # -- vocabulary -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def backend(self) -> HFTokenizer:
        """The underlying `tokenizers.Tokenizer` (e.g. to wrap in transformers)."""
        return self._backend

    def id_to_token(self, token_id: int) -> str:
        """The raw vocabulary string (byte-level alphabet for NORMAL tokens)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def token_type(self, token_id: int) -> int:
        self._check_id(token_id)
        return self._types[token_id]

    def is_special(self, token_id: int) -> bool:
        """CONTROL or UNKNOWN: hidden by `decode(skip_special_tokens=True)`."""
        return self.token_type(token_id) in (TOKEN_CONTROL, TOKEN_UNKNOWN)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < len(self._tokens):
            raise ValueError(f"token id {token_id} outside the vocabulary of {len(self._tokens)}")


def _required(fields: Fields, key: str, source: str) -> list[object]:
    value = fields.get(key)
    if not value:
        raise ValueError(f"{source} has no {key}")
    return list(value)
