"""A schema or grammar that cannot be compiled: a ConstraintError naming the request field."""

from __future__ import annotations

import pytest

from llama_mpi.mpi_server.structured import (
    ConstraintError,
    from_gbnf,
    from_json_schema,
    from_response_format,
)


@pytest.mark.parametrize("schema", [
    {"type": "foo"},
    {"$ref": "#/definitions/missing"},
    {"type": "string", "pattern": "(?<=x)a"},
    {"type": "string", "minLength": 3, "maxLength": 1},
])
def test_bad_response_format_schema_names_the_field(compiler, schema):
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "x",
                                                                        "schema": schema}})
    with pytest.raises(ConstraintError) as info:
        compiler.compile(spec)
    assert str(info.value).startswith("response_format.json_schema.schema: ")
    assert info.value.field == "response_format.json_schema.schema"
    assert isinstance(info.value, ValueError)


def test_bad_raw_json_schema_names_its_field(compiler):
    with pytest.raises(ConstraintError, match=r"^json_schema: "):
        compiler.compile(from_json_schema({"type": "object", "properties": {"a": {"type": 3}}}))


@pytest.mark.parametrize("grammar", ['root ::= "a', "root ::= undefined_rule",
                                     'start ::= "no root"'])
def test_bad_gbnf_names_the_grammar_field(compiler, grammar):
    with pytest.raises(ConstraintError, match=r"^grammar: "):
        compiler.compile(from_gbnf(grammar))


@pytest.mark.parametrize("response_format, field", [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"schema": [1]}},
     "response_format.json_schema.schema"),
    ("json", "response_format"),
])
def test_malformed_response_format_names_the_field(response_format, field):
    with pytest.raises(ConstraintError) as info:
        from_response_format(response_format)
    assert info.value.field == field


def test_text_response_format_is_no_constraint():
    assert from_response_format({"type": "text"}) is None
    assert from_response_format(None) is None
