"""The compile cache: keyed by the schema's canonical JSON, bounded, shared across threads."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from llama_mpi.mpi_server.structured import (
    GrammarCompiler,
    compiler_for,
    from_json_schema,
    from_response_format,
)


def test_cache_hit_returns_the_same_object(tokenizer, compiler):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    first = compiler.compile(from_json_schema(schema))
    hits = compiler.cache_info()["hits"]
    # the same schema arriving as other text (indented), through response_format
    again = json.loads(json.dumps(schema, indent=4))
    second = compiler.compile(from_response_format(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": again}}))
    assert second is first
    assert compiler.cache_info()["hits"] == hits + 1
    assert compiler_for(tokenizer) is compiler  # one compiler (and cache) per model


def test_cache_is_bounded_lru(compiler):
    small = GrammarCompiler(compiler.vocab, cache_size=2)
    specs = [from_json_schema({"const": i}) for i in range(3)]
    a, b = small.compile(specs[0]), small.compile(specs[1])
    assert small.compile(specs[0]) is a  # refreshes 0: 1 is now the oldest
    small.compile(specs[2])  # evicts 1
    assert small.cache_info()["size"] == 2
    assert small.compile(specs[0]) is a
    assert small.compile(specs[1]) is not b


def test_concurrent_compiles_share_one_object(compiler):
    spec = from_json_schema({"type": "array", "items": {"type": "string"}, "maxItems": 17})
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: compiler.compile(spec), range(8)))
    assert all(r is results[0] for r in results)
