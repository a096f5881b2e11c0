"""Chat templates vs llama.cpp's DeepSeek-2 renderer and transformers' apply_chat_template."""

from __future__ import annotations

from typing import Any

import pytest

from llama_mpi.models.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplate,
    encode_chat,
)
from llama_mpi.models.tokenizer import Tokenizer

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
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
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
