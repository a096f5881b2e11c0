"""How large a value an amplifying jinja operation would build, computed before it runs.

The chat template sandbox (``chat_template_sandbox``) refuses an operation whose result would
pass the output bound: these are the estimates for the filters and str methods that can make a
value far larger than their inputs in one step, and the format-spec patterns whose widths it
checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

# the widths and precisions of printf-style and str.format-style format strings
PERCENT_SPEC = re.compile(r"%%|%(?:\([^)]*\))?[#0 +\-]*(\d*)(?:\.(\d*))?")
BRACE_SPEC = re.compile(r"\{[^{}:]*:([^{}]*)\}")
DIGITS = re.compile(r"\d+")


def size_of(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1, **_: Any) -> int:
    if not (isinstance(s, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * (len(new) - len(old))


def joined_size(sep: Any, items: list[Any]) -> int:
    sep_len = len(sep) if isinstance(sep, str) else 0
    return sum(map(size_of, items)) + sep_len * max(len(items) - 1, 0)


def _indent_size(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    if not isinstance(s, str):
        return 0
    pad = width if isinstance(width, int) else len(str(width))
    return len(s) + (s.count("\n") + 1) * pad


def _wordwrap_size(s: Any, width: Any = 79, _breaks: Any = True, wrapstring: Any = None,
                   *_: Any, **__: Any) -> int:
    if not isinstance(s, str) or not isinstance(width, int) or width <= 0:
        return 0
    return len(s) + (len(s) // width + 1) * len(wrapstring if isinstance(wrapstring, str) else "\n")


def _expandtabs_size(s: Any, tabsize: Any = 8, **_: Any) -> int:
    return len(s) + s.count("\t") * tabsize if isinstance(tabsize, int) else 0


# Estimated result sizes of the amplifying filters (value first, then the filter's arguments).
FILTER_SIZE: dict[str, Callable[..., int]] = {
    "replace": _replace_size, "indent": _indent_size, "wordwrap": _wordwrap_size,
}
# ... and of the amplifying str methods (the string first, then the call's arguments).
STR_METHOD_SIZE: dict[str, Callable[..., int]] = {
    "replace": _replace_size, "expandtabs": _expandtabs_size,
}
