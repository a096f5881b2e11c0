"""llama.cpp GBNF grammars (the /completion `grammar` field) constrain the output."""

from __future__ import annotations

import re

from llama_mpi.mpi_server.structured import from_gbnf

from .conftest import random_walk

GRAMMAR = r"""
root   ::= answer " because " reason "."
answer ::= "yes" | "no" | "maybe"
reason ::= word (" " word){0,3}
word   ::= [a-z]{1,8}
"""
SHAPE = re.compile(r"(yes|no|maybe) because [a-z]{1,8}( [a-z]{1,8}){0,3}\.")


def test_gbnf_grammar_constrains_random_logits(tokenizer, compiler):
    compiled = compiler.compile(from_gbnf(GRAMMAR))
    seeds = list(range(8))
    outputs = random_walk([compiled.matcher() for _ in seeds], seeds, tokenizer.eos_id)
    texts = [tokenizer.decode(ids) for ids in outputs]
    assert all(SHAPE.fullmatch(t) for t in texts), texts
