"""The tokenizer bridge: our GGUF vocabulary as the byte strings llguidance matches against.

Built once per (tokenizer, EOS set) and cached (about 0.2 s and 35 MB for DeepSeek's 102400
tokens). Each token is one of:

- text: NORMAL tokens (GPT-2 byte alphabet undone, exactly the bytes `decode` prints) and
  USER_DEFINED tokens (their raw text, e.g. R1's ``<think>``), matched by grammar literals;
- special: CONTROL / UNKNOWN / UNUSED / BYTE tokens and llama.cpp's ``[PAD<n>]`` placeholder
  rows. llguidance never lets text match these; a lark grammar names one as ``<text>``
  (``<｜tool▁calls▁begin｜>``) or as ``<[id]>`` (what this package writes). So BOS and padding
  rows are never sampled under a constraint, and DeepSeek's tool-call markers are forced as
  the single tokens the model was trained on, not spelled out.

EOS (the given ids, by default the tokenizer's ``eos_ids``) is allowed exactly when the grammar
can end; that is llguidance's own rule for its EOS tokens.
"""

from __future__ import annotations

import re
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import llguidance

from llama_mpi.models.tokenizer.detokenizer import TOKEN_NORMAL, TOKEN_USER_DEFINED
from llama_mpi.models.tokenizer.tokenizer import Tokenizer

_PLACEHOLDER = re.compile(r"\[PAD\d+\]")


@dataclass(frozen=True, eq=False)
class GrammarVocab:
    """One model's vocabulary for the grammar library (shared by all its compiled grammars)."""

    ll_tokenizer: llguidance.LLTokenizer
    vocab_size: int
    eos_ids: tuple[int, ...]
    special_tokens: dict[str, int]  # text -> id, for <[id]> in a lark grammar

    @property
    def bitmask_words(self) -> int:
        """int32 words in one row of a token bitmask."""
        return (self.vocab_size + 31) // 32


def token_table(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """(bytes of every token, ids of the special ones), as described in the module docstring."""
    pieces: list[bytes] = []
    special: list[int] = []
    for i in range(tokenizer.vocab_size):
        kind = tokenizer.token_type(i)
        text = tokenizer.id_to_token(i)
        if kind == TOKEN_NORMAL:
            pieces.append(tokenizer.token_to_piece(i))
        elif kind == TOKEN_USER_DEFINED and text and not _PLACEHOLDER.fullmatch(text):
            pieces.append(text.encode("utf-8", "replace"))
        else:
            pieces.append((text or f"[TOKEN{i}]").encode("utf-8", "replace"))
            special.append(i)
    return pieces, special


class _Wrapper:
    """The duck-typed tokenizer `llguidance.TokenizerWrapper` reads."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: tuple[int, ...]) -> None:
        self.tokens, self.special_token_ids = token_table(tokenizer)
        self.eos_token_id = eos_ids[0]
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = weakref.ref(tokenizer)  # the cache must not keep it alive

    def __call__(self, text: str | bytes) -> list[int]:
        tokenizer = self._tokenizer()
        if tokenizer is None:
            raise RuntimeError("the tokenizer of this grammar vocabulary is gone")
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return tokenizer.encode(text, add_bos=False, parse_special=False)


_CACHE: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, ...], GrammarVocab]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def eos_key(tokenizer: Tokenizer, eos_ids: Iterable[int] | None = None) -> tuple[int, ...]:
    """The sorted EOS ids a vocabulary is built for (default: the tokenizer's `eos_ids`)."""
    if eos_ids is None:
        eos_ids = tokenizer.eos_ids or ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
    eos = tuple(sorted({int(i) for i in eos_ids}))
    if not eos:
        raise ValueError(f"{tokenizer.source}: constrained decoding needs an EOS token id")
    return eos


def grammar_vocab(tokenizer: Tokenizer, eos_ids: Iterable[int] | None = None) -> GrammarVocab:
    """The cached bridge for `tokenizer` (thread-safe; built on first use)."""
    eos = eos_key(tokenizer, eos_ids)
    with _LOCK:
        per_tokenizer = _CACHE.setdefault(tokenizer, {})
        vocab = per_tokenizer.get(eos)
        if vocab is None:
            wrapper = _Wrapper(tokenizer, eos)
            ll_tokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(wrapper), n_vocab=tokenizer.vocab_size,
                eos_token=list(eos),
            )
            special = {tokenizer.id_to_token(i): i for i in wrapper.special_token_ids
                       if i not in eos and tokenizer.id_to_token(i)}
            vocab = GrammarVocab(ll_tokenizer, tokenizer.vocab_size, eos, special)
            per_tokenizer[eos] = vocab
        return vocab
