"""Request fields -> `ConstraintSpec`: what to compile, canonicalised so equal asks share a key.

Four request forms, as OpenAI and llama.cpp's server take them:

- ``response_format: {"type": "json_object"}`` (optionally with llama.cpp's ``"schema"``):
  any JSON object;
- ``response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``;
- a raw JSON schema (llama.cpp ``/completion``'s ``json_schema`` field);
- a GBNF grammar string (llama.cpp's ``grammar`` field).

A spec is plain data (no library objects), cheap to build on the HTTP thread; validation of
shapes happens here, validation against the grammar library in `compiler.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConstraintError

Kind = Literal["json_schema", "gbnf", "lark"]


@dataclass(frozen=True)
class ConstraintSpec:
    """One constraint to compile.

    ``source`` is the canonical text: compact JSON for schemas, the grammar text
    otherwise; ``(kind, source)`` is the cache key. ``field`` names the request field in
    errors. ``parts`` lists (field, canonical schema) pairs embedded in a lark grammar (tool
    parameters), so an error can name the one at fault.
    """

    kind: Kind
    source: str
    field: str
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.source)


def canonical_json(value: Any) -> str:
    """Compact JSON: a schema sent with other whitespace or escapes gets the same key.

    Keys are not sorted: the order of ``properties`` is the order the object's keys are
    generated in, so two schemas that differ in it are different constraints.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def from_json_schema(schema: Any, field: str = "json_schema") -> ConstraintSpec:
    """A raw JSON schema (a dict, or True for "any JSON value")."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise ConstraintError(field, f"a JSON schema must be an object, not {_kind(schema)}")
    return ConstraintSpec("json_schema", canonical_json(schema), field)


def from_gbnf(grammar: Any, field: str = "grammar") -> ConstraintSpec:
    """A llama.cpp GBNF grammar (``root ::= ...``)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise ConstraintError(field, "a GBNF grammar must be a non-empty string")
    return ConstraintSpec("gbnf", grammar, field)


def from_lark(grammar: str, field: str, parts: tuple[tuple[str, str], ...] = ()) -> ConstraintSpec:
    """A grammar in llguidance's lark dialect (built by this package, e.g. for tool calls)."""
    return ConstraintSpec("lark", grammar, field, parts)


def from_response_format(
    response_format: Any, field: str = "response_format"
) -> ConstraintSpec | None:
    """OpenAI's ``response_format``; None for ``{"type": "text"}`` (no constraint)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError(field, f"must be an object, not {_kind(response_format)}")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = response_format.get("schema")  # llama.cpp's extension
        if schema is None:
            return ConstraintSpec("json_schema", canonical_json({"type": "object"}), field)
        return from_json_schema(schema, f"{field}.schema")
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        if not isinstance(inner, dict):
            raise ConstraintError(f"{field}.json_schema", "must be an object with a 'schema'")
        if "schema" not in inner:
            raise ConstraintError(f"{field}.json_schema.schema", "is required")
        return from_json_schema(inner["schema"], f"{field}.json_schema.schema")
    raise ConstraintError(
        f"{field}.type", f"{kind!r} is not one of 'text', 'json_object', 'json_schema'"
    )


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
