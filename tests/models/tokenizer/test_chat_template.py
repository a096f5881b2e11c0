"""Chat templates vs llama.cpp's DeepSeek-2 renderer and transformers' apply_chat_template."""

from __future__ import annotations

import gc
import threading
import time
import tracemalloc
from typing import Any

import pytest

from llama_mpi.models.tokenizer import chat_template as ct
from llama_mpi.models.tokenizer.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    encode_chat,
)
from llama_mpi.models.tokenizer.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi 你好"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?\nThanks"},
]
# A template exercising trim_blocks / lstrip_blocks and tojson, the transformers settings.
WHITESPACE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'user' %}
<u>{{ m['content'] | tojson }}</u>
    {% else %}
<{{ m['role'] }}>{{ m['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}<a>{% endif %}"""


def llama_cpp_deepseek2(messages: list[dict[str, str]], add_ass: bool) -> str:
    """llama.cpp's built-in LLM_CHAT_TEMPLATE_DEEPSEEK_2 rules (no BOS; that comes from add_bos)."""
    out = ""
    for m in messages:
        if m["role"] == "system":
            out += m["content"] + "\n\n"
        elif m["role"] == "user":
            out += "User: " + m["content"] + "\n\n"
        else:
            out += "Assistant: " + m["content"] + EOS
    return out + ("Assistant:" if add_ass else "")


@pytest.fixture(scope="module")
def hf(real: Tokenizer) -> Any:
    """transformers' fast tokenizer over a copy of our backend (transformers may mutate it)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    backend = HFTokenizer.from_str(real.backend.to_str())
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS)


def test_builtin_deepseek2_is_chosen_when_file_has_none(real: Tokenizer) -> None:
    template = ChatTemplate.resolve(real)
    assert template.name == "deepseek2" and (template.bos_token, template.eos_token) == (BOS, EOS)


@pytest.mark.parametrize("add_ass", [True, False])
def test_deepseek2_text_matches_llama_cpp_renderer(real: Tokenizer, add_ass: bool) -> None:
    text = ChatTemplate.resolve(real).render(CHAT, add_generation_prompt=add_ass)
    assert text == BOS + llama_cpp_deepseek2(CHAT, add_ass)


def test_deepseek2_ids_have_one_bos_like_llama_cpp(real: Tokenizer) -> None:
    # llama.cpp: tokenize(renderer text, add_special=true, parse_special=true).
    ids = encode_chat(real, ChatTemplate.resolve(real), CHAT)
    expected = [real.bos_id, *real.encode(llama_cpp_deepseek2(CHAT, True), add_bos=False)]
    assert ids == expected and ids.count(real.bos_id) == 1
    assert ids.count(real.eos_id) == 1  # the assistant turn's end-of-sentence, parsed as one id


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_templates_render_like_transformers(
    real: Tokenizer, hf: Any, name: str
) -> None:
    ours = ChatTemplate.resolve(real, override=name).render(CHAT)
    theirs = hf.apply_chat_template(
        CHAT, chat_template=BUILTIN_TEMPLATES[name], tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs


def test_raw_jinja_override_renders_like_transformers(real: Tokenizer, hf: Any) -> None:
    ours = ChatTemplate.resolve(real, override=WHITESPACE_TEMPLATE).render(CHAT)
    theirs = hf.apply_chat_template(
        CHAT, chat_template=WHITESPACE_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs


def test_chat_ids_match_transformers_tokenized_chat(real: Tokenizer, hf: Any) -> None:
    # transformers tokenizes the rendered text without adding special tokens; the template's
    # bos_token text becomes the single BOS.
    theirs = hf.apply_chat_template(
        CHAT, chat_template=BUILTIN_TEMPLATES["deepseek2"], tokenize=True,
        add_generation_prompt=True,
    )
    assert encode_chat(real, ChatTemplate.resolve(real), CHAT) == theirs["input_ids"]


def test_chatml_override_gets_bos_added_once(real: Tokenizer) -> None:
    # ChatML emits no BOS; the vocabulary's add_bos_token (true) still puts one in front.
    ids = encode_chat(real, ChatTemplate.resolve(real, override="chatml"), CHAT[:2])
    text = "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi 你好<|im_end|>\n"
    assert ids == [real.bos_id, *real.encode(text + "<|im_start|>assistant\n", add_bos=False)]


def test_text_parts_joined_with_newline_like_llama_cpp(real: Tokenizer) -> None:
    parts = [{"type": "text", "text": "2+2?"}, {"type": "text", "text": "Thanks"}]
    template = ChatTemplate.resolve(real)
    assert template.render([*CHAT[:3], {"role": "user", "content": parts}]) == template.render(CHAT)


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "empty"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user"}], "no content"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "text"),
    ],
)
def test_bad_conversations_raise_value_error(
    real: Tokenizer, messages: list, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        ChatTemplate.resolve(real).render(messages)


def test_unknown_template_name_raises_value_error(real: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown chat template 'llama9'"):
        ChatTemplate.resolve(real, override="llama9")


def test_raise_exception_in_template_becomes_value_error(real: Tokenizer) -> None:
    template = ChatTemplate.resolve(real, override="{{ raise_exception('no system here') }}")
    with pytest.raises(ValueError, match="no system here"):
        template.render(CHAT)


# --- hostile or broken templates ---------------------------------------------------------
# (the new names are looked up on the module inside each test, so that each test fails on
# its own behaviour, not all at import)

SPIN = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"


class FakeVocab:
    """The Tokenizer attributes ChatTemplate.resolve reads, with a template from 'the GGUF'."""

    bos_id, eos_id, pre, source = 0, 1, "deepseek-llm", "/models/hostile.gguf"

    def __init__(self, chat_template: str | None = None) -> None:
        self.chat_template = chat_template

    def id_to_token(self, i: int) -> str:
        return (BOS, EOS)[i]


def render_in_thread(template: ChatTemplate, messages: list, wait_s: float) -> dict[str, Any]:
    """Render on a daemon thread (a hang must fail the test, not stall it)."""
    out: dict[str, Any] = {}

    def work() -> None:
        start = time.monotonic()
        try:
            out["text"] = template.render(messages)
        except Exception as e:
            out["error"] = e
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(wait_s)
    assert not thread.is_alive(), f"render still running after {wait_s} s"
    return out


@pytest.mark.parametrize(
    "override, source_words",
    [
        (None, ["tokenizer.chat_template", "/models/hostile.gguf"]),
        ("{{ bos_token }}\n{% for m in messages %}{{ m['content'] }\n{% endfor %}",
         ["override"]),
    ],
)
def test_broken_template_is_a_load_error_naming_its_source_and_line(
    override: str | None, source_words: list[str]
) -> None:
    broken = "{{ bos_token }}\n{% for m in messages %}{{ m['content'] }\n{% endfor %}"
    with pytest.raises(ct.ChatTemplateLoadError) as err:
        ChatTemplate.resolve(FakeVocab(broken), override=override)
    message = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in message
    assert all(word in message for word in source_words), message
    assert "does not compile" in message and "line 2" in message, message


def test_build_tokenizer_refuses_a_broken_template_at_start_up(real: Tokenizer) -> None:
    from llama_mpi.mpi_server.config import ServerConfig
    from llama_mpi.mpi_server.engine_factory import build_tokenizer

    config = ServerConfig(model=real.source, chat_template="{% if messages %}no endif")
    with pytest.raises(ct.ChatTemplateLoadError, match="override.*does not compile.*line 1"):
        build_tokenizer(config)


@pytest.mark.parametrize(
    "source, tag",
    [
        ("{% include 'other.j2' %}", "include"),
        ("{% import 'macros.j2' as m %}{{ m.f() }}", "import"),
        ("{% from 'macros.j2' import f %}{{ f() }}", "import"),
        ("{% extends 'base.j2' %}", "extends"),
    ],
)
def test_include_import_extends_are_refused_at_load(source: str, tag: str) -> None:
    with pytest.raises(ct.ChatTemplateLoadError, match=f"{tag} %}}.*not supported"):
        ChatTemplate.resolve(FakeVocab(), override="{{ bos_token }}" + source)


def test_unknown_builtin_name_lists_the_valid_names() -> None:
    with pytest.raises(ct.ChatTemplateLoadError) as err:
        ChatTemplate.resolve(FakeVocab(), override="deepseek-v2")
    assert "'deepseek-v2'" in str(err.value)
    assert all(name in str(err.value) for name in BUILTIN_TEMPLATES), str(err.value)


def test_endless_loop_stops_at_the_time_bound_and_the_next_render_works() -> None:
    bound = 0.5
    source = f"{{% if messages[0]['content'] == 'spin' %}}{SPIN}{{% else %}}ok{{% endif %}}"
    template = ChatTemplate(source, render_timeout_s=bound)
    out = render_in_thread(template, [{"role": "user", "content": "spin"}], bound + 1.5)
    assert isinstance(out["error"], ct.ChatTemplateRenderError), out
    assert not isinstance(out["error"], ValueError)  # the server's fault, not the client's
    assert "render_timeout_s" in str(out["error"]) and out["elapsed"] < bound + 1.5
    assert template.render([{"role": "user", "content": "hi"}]) == "ok"


def test_concurrent_renders_keep_their_own_deadlines() -> None:
    # one template object serves every request thread: a normal render finishing must not
    # lift the deadline of a hostile one running beside it
    bound = 0.5
    source = f"{{% if messages[0]['content'] == 'spin' %}}{SPIN}{{% else %}}ok{{% endif %}}"
    template = ChatTemplate(source, render_timeout_s=bound)
    out: dict[str, Any] = {}
    spinner = threading.Thread(
        target=lambda: out.update(render_in_thread(template, [{"role": "user", "content": "spin"}],
                                                   bound + 1.5)), daemon=True)
    spinner.start()
    renders = 0
    while spinner.is_alive() and renders < 10_000:
        assert template.render([{"role": "user", "content": "hi"}]) == "ok"
        renders += 1
    spinner.join(bound + 2)
    assert renders > 0 and isinstance(out.get("error"), ct.ChatTemplateRenderError), out


def test_exponential_macro_recursion_stops_at_the_time_bound() -> None:
    bound = 0.3
    source = ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
              "{{ f(60) }}")
    out = render_in_thread(ChatTemplate(source, render_timeout_s=bound), CHAT, bound + 1.5)
    assert isinstance(out["error"], ct.ChatTemplateRenderError), out


def test_output_is_bounded_in_size() -> None:
    source = "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}"
    out = render_in_thread(ChatTemplate(source, max_output_chars=1_000_000), CHAT, 3.0)
    assert isinstance(out["error"], ct.ChatTemplateRenderError), out
    assert "max_output_chars" in str(out["error"])
    assert ChatTemplate("{{ 'x' * 10 }}", max_output_chars=10).render(CHAT) == "x" * 10


@pytest.mark.parametrize(
    "source",
    [
        "{{ 'x' * 1000000000 }}",
        "{{ 2 ** 10000000000 }}",
        "{{ 'x'|center(1000000000) }}",
        "{{ 'x'.ljust(1000000000) }}",
        "{{ '%01000000000d' % 1 }}",
        "{{ '{:1000000000}'.format(1) }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "{{ range(100000)|join('x' * 1000000) }}",
        "{{ ('x' * 100000)|replace('', 'y' * 1000) }}",
        "{% set s %}{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}{% endset %}",
    ],
)
def test_amplifying_operations_are_refused_before_they_allocate(source: str) -> None:
    start = time.monotonic()
    template = ChatTemplate(source)  # constant folding at load must not run them either
    with pytest.raises(ct.ChatTemplateRenderError, match="max_output_chars"):
        template.render(CHAT)
    assert time.monotonic() - start < 1.0


def test_memory_is_back_after_a_timed_out_render() -> None:
    grow = ("{% set ns = namespace(s='x') %}{% for i in range(23) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}")  # 8 Mi characters held, then spin
    template = ChatTemplate(grow + SPIN, render_timeout_s=0.3)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        try:
            template.render(CHAT)
        except ct.ChatTemplateRenderError:
            pass
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - before > 8 << 20  # the render did hold the string
    assert after - before < 256 << 10


def test_crash_in_the_template_is_a_render_error_and_raise_exception_a_client_error() -> None:
    crash = ChatTemplate("{{ messages[0]['content'] + 1 }}")
    with pytest.raises(ct.ChatTemplateRenderError, match="TypeError"):
        crash.render(CHAT)
    refuse = ChatTemplate("{{ raise_exception('no tools here') }}")
    with pytest.raises(ct.ChatTemplateError, match="no tools here") as err:
        refuse.render(CHAT)
    assert not isinstance(err.value, ct.ChatTemplateRenderError)
