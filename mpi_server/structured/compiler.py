"""Compile a `ConstraintSpec` against one model's vocabulary, with a bounded LRU cache.

Compiling is thread-safe and meant to run off the engine thread (the HTTP handler, or a
worker via ``asyncio.to_thread``): llguidance drops the GIL while it builds a grammar, and
the cache is guarded by a lock that is not held while compiling. Two threads asking for the
same new schema may both compile it; the first one stored wins and both get that object.

Cost (DeepSeek's 102400-token vocabulary, 2-core CPU): a nested JSON schema ~1.3 ms cold,
``json_object`` ~0.3 ms, a cache hit ~2 us plus the canonical-JSON key; llguidance builds
lexer states lazily, so the first mask of a new grammar costs ~0.4 ms instead of ~20 us.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import llguidance
from llguidance.gbnf_to_lark import gbnf_to_lark

from llama_mpi.models.tokenizer.tokenizer import Tokenizer

from .errors import ConstraintError
from .matcher import GrammarMatcher
from .spec import ConstraintSpec
from .vocab import GrammarVocab, eos_key, grammar_vocab

if TYPE_CHECKING:  # a TypedDict of llguidance's stub only, absent at run time
    from llguidance._lib import JsonCompileOptions

# JSON is written the way json.dumps writes it (", " and ": ", no other whitespace): a model
# left free to choose whitespace can emit it forever, and this form is what models see most.
# `lenient: False`: a schema keyword llguidance does not implement is an error, not ignored.
DEFAULT_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}
_MAX_ERROR = 600  # characters of a library message kept in a ConstraintError


class CompiledGrammar:
    """A compiled constraint; `matcher()` gives each sequence its own cheap (~5 us) copy."""

    def __init__(self, spec: ConstraintSpec, vocab: GrammarVocab, grammar: str,
                 template: llguidance.LLMatcher) -> None:
        self.spec = spec
        self.vocab = vocab
        self.grammar = grammar  # llguidance's serialized grammar
        self._template = template  # never advanced; only copied
        self._lock = threading.Lock()

    def matcher(self) -> GrammarMatcher:
        with self._lock:
            return GrammarMatcher(self._template.deep_copy(), self.vocab)


class GrammarCompiler:
    """Compiles and caches constraints for one vocabulary (one per model: `compiler_for`)."""

    def __init__(self, vocab: GrammarVocab, *, cache_size: int = 256,
                 json_options: dict[str, Any] | None = None) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.vocab = vocab
        self.cache_size = cache_size
        self.json_options = dict(DEFAULT_JSON_OPTIONS if json_options is None else json_options)
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        """The compiled form of `spec`, from the cache when there; ConstraintError if invalid."""
        key = spec.key
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return found
            self.misses += 1
        compiled = self._compile(spec)
        with self._lock:
            found = self._cache.get(key)
            if found is not None:  # another thread stored it meanwhile
                self._cache.move_to_end(key)
                return found
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return compiled

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "size": len(self._cache),
                    "max_size": self.cache_size}

    # -- compiling --------------------------------------------------------------------------

    def _compile(self, spec: ConstraintSpec) -> CompiledGrammar:
        grammar = self._to_grammar(spec.kind, spec.source, spec.field)
        template = llguidance.LLMatcher(self.vocab.ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            error = template.get_error()
            for field, schema in spec.parts:  # name the embedded schema at fault, if one is
                part = llguidance.LLMatcher(
                    self.vocab.ll_tokenizer, self._to_grammar("json_schema", schema, field),
                    log_level=0)
                if part.is_error():
                    raise ConstraintError(field, _clean(part.get_error()))
            raise ConstraintError(spec.field, _clean(error))
        return CompiledGrammar(spec, self.vocab, grammar, template)

    def _to_grammar(self, kind: str, source: str, field: str) -> str:
        try:
            if kind == "json_schema":
                # a plain dict: llguidance checks the option names and values itself
                options = cast("JsonCompileOptions", self.json_options)
                return llguidance.LLMatcher.grammar_from_json_schema(source, defaults=options)
            if kind == "gbnf":
                return llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(source))
            if kind == "lark":
                return llguidance.LLMatcher.grammar_from_lark(source)
        except Exception as e:  # the GBNF converter raises plain Exceptions
            raise ConstraintError(field, _clean(str(e) or type(e).__name__)) from e
        raise ValueError(f"unknown constraint kind {kind!r}")


def _clean(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_ERROR else message[:_MAX_ERROR] + " ..."


_COMPILERS: weakref.WeakKeyDictionary[Tokenizer, dict[tuple[int, ...], GrammarCompiler]] = (
    weakref.WeakKeyDictionary()
)
_LOCK = threading.Lock()


def compiler_for(tokenizer: Tokenizer, eos_ids: Iterable[int] | None = None) -> GrammarCompiler:
    """The shared compiler (and cache) of a model's tokenizer; thread-safe."""
    eos = eos_key(tokenizer, eos_ids)
    vocab = grammar_vocab(tokenizer, eos)
    with _LOCK:
        per_tokenizer = _COMPILERS.setdefault(tokenizer, {})
        compiler = per_tokenizer.get(eos)
        if compiler is None:
            compiler = per_tokenizer[eos] = GrammarCompiler(vocab)
        return compiler
