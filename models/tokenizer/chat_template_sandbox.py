"""Compile-at-load and bounded rendering for chat templates.

A chat template comes from the model file or the operator, so it is code the server did not
write: it is compiled when the model loads (a broken one is a start-up error naming where it
came from), it may not include, import or extend other templates, and each render is bounded
in time and in size, so that no template can hang a worker thread or fill the memory.

Bounds, all checked in this module's own code, so that a render stops only at known points:

* time: a per-render deadline (thread-local, so that renders in several threads do not
  share it), checked on every step of every `{% for %}` (the loop's iterable is wrapped at
  compile time, so even a loop with an empty body checks it) and on every call (macros,
  recursion, methods). A jinja template has no other way to repeat work: no while loop, and
  recursion goes through calls;
* output: the rendered chunks are counted as they come;
* single values: the operations that can build a value far larger than their inputs in one
  step (`*`, `**`, `+`, `%`, `~`, joins, padding, replace, indent, wordwrap, expandtabs,
  block `set`) are checked before they run, every call's and filter's result after, and no
  call or filter may be passed a number over the output bound (a width, a repeat count).

A sys.settrace hook would also stop Python-level loops inside one filter call (those run
over values the bounds above already limit), but it slows the interpreter for the whole
render: about 9x on the DeepSeek-V2 template, where these checks cost well under 2x.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from functools import wraps
from typing import Any, cast

import jinja2
from jinja2 import nodes, pass_context
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .chat_template_sizes import (
    BRACE_SPEC,
    DIGITS,
    FILTER_SIZE,
    PERCENT_SPEC,
    STR_METHOD_SIZE,
    joined_size,
    size_of,
)

DEFAULT_RENDER_TIMEOUT_S = 2.0
DEFAULT_MAX_OUTPUT_CHARS = 16 * 2**20  # far above any context window's worth of text

_UNSUPPORTED_TAGS: dict[type[nodes.Node], str] = {
    nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "import",
    nodes.Extends: "extends",
}
_LOOP_GUARD = "_chat_template_loop_guard"  # the filter every {% for %} iterable goes through


class ChatTemplateLoadError(ValueError):
    """The configured chat template cannot be used: a start-up error, not a client's."""


class ChatTemplateRenderError(RuntimeError):
    """The chat template, not the request, failed: over its time or size bound, or crashed."""


class _RefusingLoader(jinja2.BaseLoader):
    def get_source(self, environment: jinja2.Environment, template: str) -> Any:
        raise jinja2.TemplateNotFound(f"{template} (chat templates cannot load other templates)")


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` goes through the environment's size check before it joins."""

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            join = "(markup_join if context.eval_ctx.volatile else str_join)"
        else:
            join = "markup_join" if frame.eval_ctx.autoescape else "str_join"
        self.write(f"environment.bounded_join({join}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Deadline(threading.local):
    at = math.inf  # outside a render (e.g. constant folding at compile time): none
    timeout_s = 0.0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The transformers-style immutable sandbox, with no loader, a render deadline and
    size-checked operations."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_chars: int, filters: Mapping[str, Callable[..., Any]] | None = None,
                 globals: Mapping[str, Any] | None = None, **options: Any) -> None:
        super().__init__(loader=_RefusingLoader(), **options)
        self.max_chars = max_chars
        self.deadline = _Deadline()
        self.filters.update(filters or {})
        self.globals.update(globals or {})
        self.filters.update({k: self._guard_filter(k, f) for k, f in self.filters.items()})
        self.filters[_LOOP_GUARD] = self._loop_guard()

    # --- the checks -----------------------------------------------------------------------
    def check_time(self) -> None:
        if time.monotonic() > self.deadline.at:
            raise ChatTemplateRenderError(
                f"chat template render ran past its {self.deadline.timeout_s:g} s bound "
                "(render_timeout_s)")

    def _loop_guard(self) -> Callable[..., Any]:
        deadline, check, clock = self.deadline, self.check_time, time.monotonic

        @pass_context  # never folded at compile time
        def guard(_context: Any, iterable: Any) -> Any:
            check()
            at = deadline.at
            for item in iterable:
                if clock() > at:
                    check()
                yield item

        return guard

    def refuse(self, size: int, what: str) -> None:
        """Refuse to build a value of `size` characters (or items) over the bound."""
        if size > self.max_chars:
            raise ChatTemplateRenderError(
                f"chat template {what} builds a value of {size} characters, over the "
                f"{self.max_chars} limit (max_output_chars)")

    def checked(self, result: Any, what: str) -> Any:
        if size_of(result) > self.max_chars:
            self.refuse(size_of(result), what)
        return result

    def _check_ints(self, args: Iterable[Any], what: str) -> None:
        for a in args:
            if type(a) is int and abs(a) > self.max_chars:  # a width, a count: not a bool
                raise ChatTemplateRenderError(
                    f"chat template passes {a} to {what}: over the {self.max_chars} limit "
                    "(max_output_chars)")

    def _check_format(self, fmt: Any, pattern: re.Pattern[str], what: str) -> None:
        if isinstance(fmt, str) and ("%" in fmt or "{" in fmt):
            specs = "".join(str(g or "") for m in pattern.finditer(fmt) for g in m.groups())
            self._check_ints(map(int, DIGITS.findall(specs)), what)

    # --- where they apply -----------------------------------------------------------------
    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        if operator == "+" and type(left) is str and type(right) is str:  # the common case
            if len(left) + len(right) > self.max_chars:
                self.refuse(len(left) + len(right), "'+'")
            return left + right
        what = f"'{operator}'"
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(n, int) and size_of(seq):
                    self.refuse(len(seq) * n, what)
            if isinstance(left, int) and isinstance(right, int):  # a number's bytes
                self.refuse((left.bit_length() + right.bit_length()) // 8, what)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                self.refuse(left.bit_length() * right // 8, what)
        elif operator == "+":
            self.refuse(size_of(left) + size_of(right), what)
        elif operator == "%" and isinstance(left, str):
            self._check_format(left, PERCENT_SPEC, what)
            self._check_ints(right if isinstance(right, tuple) else (right,), what)
        return self.checked(super().call_binop(context, operator, left, right), what)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any,
             **kwargs: Any) -> Any:
        __self.check_time()
        name = getattr(__obj, "__name__", "a function")
        # _loop_vars / _block_vars are jinja's own, for functions that take the context
        own = {k: v for k, v in kwargs.items() if k not in ("_loop_vars", "_block_vars")}
        __self._check_ints((*args, *own.values()), name)
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            if name == "join" and len(args) == 1 and not own:
                items = list(args[0])
                __self.refuse(joined_size(owner, items), "join()")
                args = (items,)
            elif name in STR_METHOD_SIZE:
                __self.refuse(STR_METHOD_SIZE[name](owner, *args, **own), f"{name}()")
        return __self.checked(super().call(__context, __obj, *args, **kwargs), name)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        what = f"{value.__name__}()"
        self._check_format(value.__self__, BRACE_SPEC, what)

        @wraps(wrapper)
        def checked_format(*args: Any, **kwargs: Any) -> str:
            return self.checked(wrapper(*args, **kwargs), what)

        return checked_format

    def _guard_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # a context arg
        size, what = FILTER_SIZE.get(name), f"filter {name!r}"

        @wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            value, params = args[skip] if len(args) > skip else None, args[skip + 1:]
            self._check_ints((*params, *kwargs.values()), what)
            if name == "format":
                self._check_format(value, PERCENT_SPEC, what)
            elif name == "join" and value is not None:
                items = list(value)
                self.refuse(joined_size(params[0] if params else kwargs.get("d", ""), items),
                            what)
                args = (*args[:skip], items, *params)
            elif size is not None:
                self.refuse(size(value, *params, **kwargs), what)
            return self.checked(func(*args, **kwargs), what)

        return guarded

    def bounded_join(self, join: Callable[[Iterable[Any]], str], parts: tuple[Any, ...]) -> str:
        self.refuse(sum(map(size_of, parts)), "'~'")
        return self.checked(join(parts), "'~'")

    def concat(self, parts: Iterable[str]) -> str:
        # block `set`, `filter` blocks and macro bodies join their output here
        parts = parts if isinstance(parts, list) else list(parts)
        self.refuse(sum(map(len, parts)), "block")
        return "".join(parts)


def compile_template(env: BoundedSandbox, source: str, origin: str) -> jinja2.Template:
    """Parse and compile `source`, or raise ChatTemplateLoadError naming `origin`."""
    try:
        ast = env.parse(source)
    except jinja2.TemplateSyntaxError as e:
        lines = source.splitlines()
        at = f"line {e.lineno}"
        if e.lineno and 0 < e.lineno <= len(lines):
            at += f": {lines[e.lineno - 1].strip()[:120]!r}"
        raise ChatTemplateLoadError(f"{origin} does not compile: {e.message} ({at})") from None
    except Exception as e:  # e.g. nesting deep enough to exhaust the parser's recursion
        raise ChatTemplateLoadError(
            f"{origin} does not compile: {type(e).__name__}: {e}") from None
    for node in ast.find_all(tuple(_UNSUPPORTED_TAGS)):
        raise ChatTemplateLoadError(
            f"{origin} uses {{% {_UNSUPPORTED_TAGS[type(node)]} %}} (line {node.lineno}): "
            "include/import/extends are not supported, a chat template must be self-contained")
    for loop in ast.find_all(nodes.For):  # every step of every loop checks the deadline
        loop.iter = nodes.Filter(loop.iter, _LOOP_GUARD, [], [], None, None, lineno=loop.lineno)
    try:
        return env.from_string(ast)
    except Exception as e:
        raise ChatTemplateLoadError(
            f"{origin} does not compile: {type(e).__name__}: {e}") from None


def render_bounded(template: jinja2.Template, context: dict[str, Any], timeout_s: float,
                   max_chars: int) -> str:
    """Render with a deadline and an output bound; ChatTemplateRenderError past either."""
    env = template.environment
    if not isinstance(env, BoundedSandbox):
        raise TypeError("render_bounded needs a template compiled by compile_template")
    deadline = env.deadline
    deadline.at, deadline.timeout_s = time.monotonic() + timeout_s, timeout_s
    chunks: list[str] = []
    total = 0
    # a generator (annotated as an Iterator): closing it stops the render at once
    stream = cast(Generator[str, None, None], template.generate(context))
    try:
        for chunk in stream:
            total += len(chunk)
            if total > max_chars:
                raise ChatTemplateRenderError(
                    f"chat template output passed {max_chars} characters (max_output_chars)")
            chunks.append(chunk)
    finally:
        stream.close()
        deadline.at = math.inf
    return "".join(chunks)
