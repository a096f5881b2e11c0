"""The one error type of structured outputs: a request constraint this server cannot take."""

from __future__ import annotations


class ConstraintError(ValueError):
    """A schema, grammar or tool definition that cannot be compiled.

    ``field`` is the request field at fault, as a client would spell it
    (``response_format.json_schema.schema``, ``grammar``, ``tools[1].function.parameters``);
    the message starts with it, so the HTTP layer can answer 400 with ``str(error)`` as is.
    """

    def __init__(self, field: str, detail: str) -> None:
        self.field = field
        self.detail = detail.strip()
        super().__init__(f"{field}: {self.detail}")
