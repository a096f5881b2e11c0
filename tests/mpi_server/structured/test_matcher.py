"""The per-sequence matcher and the batched mask step: EOS, mixed batches, padded logits."""

from __future__ import annotations

import pytest
import torch

from llama_mpi.mpi_server.structured import apply_grammar_masks, from_gbnf


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_bos=False, parse_special=False)


def test_eos_allowed_exactly_when_the_grammar_can_end(tokenizer, compiler):
    matcher = compiler.compile(from_gbnf('root ::= "ab" "cd"?')).matcher()
    eos = tokenizer.eos_id
    assert not matcher.allowed_mask()[eos] and not matcher.can_end()
    for token in _ids(tokenizer, "ab"):
        assert matcher.accept(token)
    mask = matcher.allowed_mask()
    assert mask[eos] and matcher.can_end() and not matcher.is_terminated()
    assert mask.sum() > 1  # "cd" may still follow
    for token in _ids(tokenizer, "cd"):
        assert matcher.accept(token)
    mask = matcher.allowed_mask()
    assert matcher.is_terminated() and mask[eos] and mask.sum() == 1  # only EOS is left
    assert matcher.accept(eos)


def test_disallowed_token_is_rejected(tokenizer, compiler):
    matcher = compiler.compile(from_gbnf('root ::= "yes"')).matcher()
    (bad,) = _ids(tokenizer, "x")
    assert not matcher.allowed_mask()[bad]
    assert not matcher.accept(bad)
    assert matcher.error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # numpy and torch paths
def test_mixed_batch_masks_only_constrained_rows(tokenizer, compiler, dtype):
    compiled = compiler.compile(from_gbnf('root ::= [0-9]+'))
    matchers = [compiled.matcher(), None, compiled.matcher(), None]
    logits = torch.randn(4, tokenizer.vocab_size, generator=torch.Generator().manual_seed(0))
    logits = logits.to(dtype)
    before = logits.clone()
    apply_grammar_masks(logits, matchers)
    assert torch.equal(logits[1], before[1]) and torch.equal(logits[3], before[3])
    allowed = matchers[0].allowed_mask()
    for row in (0, 2):
        assert torch.equal(torch.isfinite(logits[row]), allowed)
        assert torch.equal(logits[row][allowed], before[row][allowed])
    digits = {t for t in range(tokenizer.vocab_size) if allowed[t]}
    assert digits and all(tokenizer.decode([t]).isdigit() for t in digits)


def test_all_free_batch_is_untouched(tokenizer):
    logits = torch.randn(3, 50)
    before = logits.clone()
    apply_grammar_masks(logits, [None, None, None])
    assert torch.equal(logits, before)


def test_padded_logit_columns_are_forbidden(tokenizer, compiler):
    matcher = compiler.compile(from_gbnf('root ::= "a"')).matcher()
    logits = torch.zeros(2, tokenizer.vocab_size + 77)
    apply_grammar_masks(logits, [matcher, None])
    assert torch.isinf(logits[0, tokenizer.vocab_size:]).all()
    assert torch.isfinite(logits[0]).sum() >= 1 and torch.isfinite(logits[1]).all()


def test_batch_of_many_rows_matches_single_rows(tokenizer, compiler):
    compiled = compiler.compile(from_gbnf('root ::= ("x" | "yz")+ "!"'))
    matchers = [compiled.matcher() for _ in range(18)]  # parallel fill from 16 rows on
    for m, token in zip(matchers[1:], _ids(tokenizer, "xyzxx") * 3, strict=False):
        assert m.accept(token)
    logits = torch.zeros(18, tokenizer.vocab_size)
    apply_grammar_masks(logits, matchers)
    for row, m in enumerate(matchers):
        assert torch.equal(torch.isfinite(logits[row]), m.allowed_mask())


def test_special_tokens_are_never_text(tokenizer, compiler):
    matcher = compiler.compile(from_gbnf("root ::= [^x]*")).matcher()
    mask = matcher.allowed_mask()
    assert not mask[tokenizer.bos_id]
    assert not mask[tokenizer.token_to_id("<｜tool▁calls▁begin｜>")]
