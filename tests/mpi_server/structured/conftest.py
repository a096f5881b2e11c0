"""Vocabularies and a random-logits "model" for the structured-output tests.

`tokenizer` is the real DeepSeek-V2 vocabulary (``tests/data``, kept in the repository) with
DeepSeek's five tool-call markers put in five of its ``[PAD<n>]`` rows as CONTROL tokens, the
way the V2.5/V3 vocabularies carry them; `small_tokenizer` is the built-in vocabulary without
markers (markers then spelled as text).
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from llama_mpi.models.gguf.builtin_vocab import builtin_vocab
from llama_mpi.models.tokenizer.detokenizer import TOKEN_CONTROL
from llama_mpi.models.tokenizer.tokenizer import Tokenizer, read_tokenizer_fields
from llama_mpi.mpi_server.structured import (
    GrammarMatcher,
    apply_grammar_masks,
    compiler_for,
)
from llama_mpi.mpi_server.structured.tool_call_types import MARKERS
from tests.fixtures import DEEPSEEK_VOCAB

VOCAB = DEEPSEEK_VOCAB


def with_markers(fields: dict[str, object]) -> dict[str, object]:
    """`fields` with the tool-call markers as CONTROL tokens in the first placeholder rows."""
    tokens = list(fields["tokenizer.ggml.tokens"])  # type: ignore[arg-type]
    types = list(fields["tokenizer.ggml.token_type"])  # type: ignore[arg-type]
    free = [i for i, t in enumerate(tokens) if str(t).startswith("[PAD")]
    for marker, i in zip(MARKERS, free, strict=False):
        tokens[i], types[i] = marker, TOKEN_CONTROL
    return {**fields, "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(with_markers(read_tokenizer_fields(VOCAB)), str(VOCAB))


@pytest.fixture(scope="session")
def small_tokenizer() -> Tokenizer:
    return Tokenizer.from_metadata(builtin_vocab(1024, n_merges=400), "<builtin>")


@pytest.fixture(scope="session")
def compiler(tokenizer):
    return compiler_for(tokenizer)


def marker_id(tokenizer: Tokenizer, marker: str) -> int:
    token_id = tokenizer.token_to_id(marker)
    assert token_id is not None, marker
    return token_id


def closing_bias(tokenizer: Tokenizer, chars: str = '"}]', value: float = 2.0) -> torch.Tensor:
    """A logits bias toward tokens holding one of `chars`: a random model so biased still
    gets any token the grammar allows, but closes free-form JSON in a few hundred tokens."""
    table = tokenizer.piece_table(skip_special_tokens=False)
    hits = [any(c.encode() in piece for c in chars) for piece in table]
    return torch.tensor(hits, dtype=torch.float32) * value


def random_walk(matchers: Sequence[GrammarMatcher], seeds: Sequence[int], eos_id: int,
                max_tokens: int = 2000, width: int | None = None,
                bias: torch.Tensor | None = None) -> list[list[int]]:
    """A random-logits model: per row, per step, ``randn`` logits from the row's seeded
    generator (plus `bias`), masked by its grammar in one batched call, then the best allowed
    token. Rows stop on EOS (not kept in the output) or when the grammar is terminated."""
    width = width or matchers[0].vocab_size
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    outputs: list[list[int]] = [[] for _ in matchers]
    live: list[GrammarMatcher | None] = list(matchers)
    for _ in range(max_tokens):
        rows = [i for i, m in enumerate(live) if m is not None]
        if not rows:
            break
        logits = torch.stack([torch.randn(width, generator=gens[i]) for i in rows])
        if bias is not None:
            logits[:, : bias.shape[0]] += bias
        apply_grammar_masks(logits, [live[i] for i in rows])
        for row, token in zip(rows, logits.argmax(dim=1).tolist(), strict=True):
            matcher = live[row]
            assert matcher is not None
            assert matcher.accept(token), matcher.error
            if token == eos_id:
                live[row] = None
                continue
            outputs[row].append(token)
            if matcher.is_terminated():
                live[row] = None
    unfinished = [seeds[i] for i, m in enumerate(live) if m is not None]
    assert not unfinished, f"seeds {unfinished} did not finish in {max_tokens} tokens"
    return outputs


def validate(value: object, schema: dict) -> None:
    """jsonschema.validate; the test skips, saying why, where jsonschema is not installed."""
    jsonschema = pytest.importorskip(
        "jsonschema", reason="validating outputs needs jsonschema (setup.py's test extra)")
    jsonschema.validate(value, schema)
