"""Tokenizer rebuilt from GGUF metadata vs llama.cpp's test vectors and gguf's own reader."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llama_mpi.models.tokenizer.tokenizer import Tokenizer, read_tokenizer_fields
from tests.fixtures import DEEPSEEK_VOCAB

VOCAB = DEEPSEEK_VOCAB  # kept in the repository: tests/data/README.md
DATA = VOCAB.parent
SEPARATOR = "\n__ggml_vocab_test__\n"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# Emoji (with ZWJ and variation selector), CJK, combining marks, controls, whitespace runs,
# lone surrogates.
AWKWARD = list("😶‍🌫️🦙🚀你好世界한국어ёй\u0301\u0308\u200b\x00\x01\x1b\x7f\r\n\t 　～！ø")
AWKWARD += ["\ud800", "\udfff"]
TEXT = st.text(
    st.one_of(st.sampled_from(AWKWARD), st.characters(exclude_categories=[])), max_size=40
)


def _need_vocab() -> None:
    if not VOCAB.exists():
        pytest.skip(
            "needs tests/data/ggml-vocab-deepseek-llm.gguf (llama.cpp's test vectors), "
            f"not found at {VOCAB}"
        )


@pytest.fixture(scope="module")
def real() -> Tokenizer:
    _need_vocab()
    return Tokenizer.from_gguf(VOCAB)


def llama_cpp_cases() -> list[tuple[str, list[int]]]:
    _need_vocab()
    inputs = VOCAB.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(SEPARATOR)
    outputs = VOCAB.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    # Both files end with a separator / newline, leaving one empty trailing entry each.
    assert inputs[-1] == "" and outputs[-1] == "" and len(inputs) == len(outputs)
    pairs = zip(inputs[:-1], outputs[:-1], strict=True)
    return [(i, [int(t) for t in o.split()]) for i, o in pairs]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    """256 GPT-2 byte tokens (ids = byte values), 5 merges, 2 control and 1 user token."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    space = alphabet[ord(" ")]
    tokens += ["he", "ll", "hell", "hello", space + "w", "<s>", "</s>", "[USER]"]
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 261 + [3, 3, 4],
        "tokenizer.ggml.merges": ["h e", "l l", "he ll", "hell o", space + " w"],
        "tokenizer.ggml.bos_token_id": 261,
        "tokenizer.ggml.eos_token_id": 262,
        "tokenizer.ggml.add_bos_token": True,
    }, source="tiny")


def without_surrogates(text: str) -> str:
    # UTF-8 cannot encode lone surrogates; the tokenizer documents them as U+FFFD.
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def test_encode_matches_llama_cpp_vectors(real: Tokenizer) -> None:
    cases = llama_cpp_cases()
    wrong = [(text, real.encode(text, add_bos=False), ids) for text, ids in cases]
    wrong = [w for w in wrong if w[1] != w[2]]
    assert len(cases) == 46 and wrong == []


def test_decode_of_llama_cpp_vectors_gives_input(real: Tokenizer) -> None:
    wrong = [(text, real.decode(ids)) for text, ids in llama_cpp_cases()]
    assert [w for w in wrong if w[0] != w[1]] == []


def test_metadata_reader_reads_what_gguf_writer_wrote(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "deepseek2")
    writer.add_uint32("deepseek2.block_count", 27)  # non-tokenizer keys must be skipped
    writer.add_array("deepseek2.some_strings", ["x", "yz"])
    writer.add_array("deepseek2.some_floats", [0.5, 1.5])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("deepseek-llm")
    writer.add_token_list(["a", "b", "ab", "ĠΩ", "<｜end▁of▁sentence｜>"])
    writer.add_token_types([1, 1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(4)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{{ bos_token }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert read_tokenizer_fields(path) == {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "ĠΩ", "<｜end▁of▁sentence｜>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 1, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 4,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": "{{ bos_token }}",
    }


def test_special_ids_and_add_bos_from_metadata(real: Tokenizer) -> None:
    # tests/data/README.md: 102400 tokens, BOS 100000, EOS 100001, add_bos true; the
    # file also sets padding_token_id 100001 (the reference notes padding = EOS for DeepSeek).
    assert real.vocab_size == 102400
    assert (real.bos_id, real.eos_id, real.pad_id) == (100000, 100001, 100001)
    assert real.add_bos is True
    assert real.eos_ids == {100001}
    assert real.chat_template is None
    assert real.id_to_token(100000) == BOS and real.id_to_token(100001) == EOS


def test_encode_prepends_bos_when_file_says_so(real: Tokenizer) -> None:
    text, ids = llama_cpp_cases()[11]  # "Hello world"
    assert real.encode(text) == [100000, *ids]
    assert real.encode(text, add_bos=False) == ids


def test_control_token_text_parsed_only_with_parse_special(real: Tokenizer) -> None:
    # llama.cpp: CONTROL tokens match in the text only when parse_special is set.
    assert real.encode(EOS, add_bos=False) == [100001]
    plain = real.encode(EOS, add_bos=False, parse_special=False)
    assert 100001 not in plain and real.decode(plain) == EOS


def test_user_defined_token_always_matched_and_printed_raw(real: Tokenizer) -> None:
    # Id 100002 is USER_DEFINED "ø" in the file; llama.cpp matches it even without
    # parse_special and prints its raw text.
    assert real.token_type(100002) == 4 and real.id_to_token(100002) == "ø"
    assert real.encode("ø", add_bos=False, parse_special=False) == [100002]
    assert real.decode([100002]) == "ø"


def test_decode_hides_control_tokens_unless_asked(real: Tokenizer) -> None:
    ids = [100000, 17464, 1843, 100001]  # BOS "Hello world" EOS, ids from the llama.cpp vectors
    assert real.decode(ids) == "Hello world"
    assert real.decode(ids, skip_special_tokens=False) == f"{BOS}Hello world{EOS}"
    assert real.is_special(100000) and not real.is_special(17464)


def test_unknown_pre_tokenizer_rejected_with_name_and_source() -> None:
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe",
              "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []}
    with pytest.raises(ValueError, match=r"'llama-bpe'.*my\.gguf"):
        Tokenizer.from_metadata(fields, source="my.gguf")


def test_non_bpe_model_rejected() -> None:
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "deepseek-llm",
              "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_metadata(fields)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_round_trip_real_vocab(real: Tokenizer, text: str) -> None:
    assert real.decode(real.encode(text, add_bos=False)) == without_surrogates(text)


def test_tiny_vocab_applies_merges_by_rank(tiny: Tokenizer) -> None:
    # By hand: "hello" merges fully; " world" only merges "Ġ w"; others stay bytes.
    assert tiny.encode("hello world", add_bos=False) == [259, 260, *b"orld"]


def test_tiny_vocab_control_and_user_tokens(tiny: Tokenizer) -> None:
    assert tiny.encode("[USER]hello</s>") == [261, 263, 259, 262]
    assert tiny.encode("</s>", add_bos=False, parse_special=False) == list(b"</s>")


def test_eot_token_counts_as_end_of_generation(tiny: Tokenizer) -> None:
    # llama.cpp stops on every end-of-generation id: EOS plus EOT/EOM when the file names them.
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "deepseek-llm",
              "tokenizer.ggml.tokens": ["a", "<eos>", "<eot>"],
              "tokenizer.ggml.token_type": [1, 3, 3],
              "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 2}
    assert Tokenizer.from_metadata(fields).eos_ids == {1, 2}
    assert tiny.eos_ids == {262}


def test_truncated_gguf_raises_value_error(tmp_path: Path) -> None:
    _need_vocab()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(VOCAB.read_bytes()[:100_000])
    with pytest.raises(ValueError, match="truncated"):
        Tokenizer.from_gguf(cut)


def test_deepseek_v3_groups_digits_by_three(tiny: Tokenizer) -> None:
    # llama.cpp's DEEPSEEK3_LLM splits \p{N}{1,3} first, so BPE never merges across groups;
    # deepseek-llm keeps the digit run whole. Merges "1 2", "12 3" by hand.
    alphabet = [tiny.id_to_token(b) for b in range(256)]
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [*alphabet, "12", "123"],
              "tokenizer.ggml.merges": ["1 2", "12 3"]}
    v3 = Tokenizer.from_metadata({**fields, "tokenizer.ggml.pre": "deepseek-v3"})
    llm = Tokenizer.from_metadata({**fields, "tokenizer.ggml.pre": "deepseek-llm"})
    assert v3.encode("1234123") == [257, ord("4"), 256, ord("3")]
    assert llm.encode("1234123") == [257, ord("4"), 257]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=TEXT)
def test_round_trip_tiny_vocab(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text, add_bos=False)
    assert tiny.decode(ids) == without_surrogates(text)
    # Pure byte-level: every non-merged token is one UTF-8 byte of the text.
    assert len(ids) <= len(without_surrogates(text).encode("utf-8"))


def test_load_time_real_vocab() -> None:
    _need_vocab()
    start = time.perf_counter()
    Tokenizer.from_gguf(VOCAB)
    elapsed = time.perf_counter() - start
    print(f"load time of the 102400-token vocabulary: {elapsed:.3f} s")
    assert elapsed < 3.0  # about 0.3 s on an idle core; generous for a shared machine
