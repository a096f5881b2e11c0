"""JSON-schema and json_object constraints under a random-logits model."""

from __future__ import annotations

import json

from llama_mpi.mpi_server.structured import from_json_schema, from_response_format

from .conftest import closing_bias, random_walk, validate

NESTED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "geo": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                    "required": ["lat", "lon"],
                    "additionalProperties": False,
                },
            },
            "required": ["street", "geo"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "scores": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"k": {"type": "string", "maxLength": 6}, "v": {"type": "boolean"}},
                "required": ["k", "v"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["name", "role", "address", "tags"],
    "additionalProperties": False,
}


def test_nested_schema_holds_for_20_seeds(tokenizer, compiler):
    spec = from_response_format(
        {"type": "json_schema", "json_schema": {"name": "person", "schema": NESTED,
                                                "strict": True}})
    compiled = compiler.compile(spec)
    seeds = list(range(20))
    outputs = random_walk([compiled.matcher() for _ in seeds], seeds, tokenizer.eos_id)
    for ids in outputs:
        value = json.loads(tokenizer.decode(ids))  # parses ...
        validate(value, NESTED)  # ... and validates
        assert list(value) == [k for k in NESTED["properties"] if k in value]  # schema order


def test_json_object_mode_gives_an_object(tokenizer, compiler):
    compiled = compiler.compile(from_response_format({"type": "json_object"}))
    seeds = list(range(5))
    outputs = random_walk([compiled.matcher() for _ in seeds], seeds, tokenizer.eos_id,
                          bias=closing_bias(tokenizer))
    for ids in outputs:
        assert isinstance(json.loads(tokenizer.decode(ids)), dict)


def test_raw_json_schema_field(tokenizer, compiler):
    schema = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9},
              "minItems": 2, "maxItems": 3}
    compiled = compiler.compile(from_json_schema(schema))
    (ids,) = random_walk([compiled.matcher()], [7], tokenizer.eos_id)
    validate(json.loads(tokenizer.decode(ids)), schema)


def test_pydantic_model_schema(tokenizer, compiler):
    """What `openai`'s ``chat.completions.parse(response_format=Model)`` sends: a pydantic
    schema with ``$defs`` references, enums, optional and list fields."""
    from enum import Enum
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Color(str, Enum):
        red = "red"
        green = "green"

    class Part(BaseModel):
        model_config = ConfigDict(extra="forbid")
        label: str = Field(max_length=8)
        color: Color

    class Order(BaseModel):
        model_config = ConfigDict(extra="forbid")
        kind: Literal["order", "quote"]
        parts: list[Part] = Field(max_length=3)
        note: str | None = Field(max_length=10)

    schema = Order.model_json_schema()
    assert "$defs" in schema
    compiled = compiler.compile(from_response_format(
        {"type": "json_schema", "json_schema": {"name": "Order", "schema": schema,
                                                "strict": True}}))
    seeds = list(range(5))
    for ids in random_walk([compiled.matcher() for _ in seeds], seeds, tokenizer.eos_id):
        Order.model_validate_json(tokenizer.decode(ids))
