"""Pre-tokenizer regex sequences that llama.cpp applies for each `tokenizer.ggml.pre` value.

llama.cpp splits text with a list of regexes, each one splitting the pieces the previous one
produced, and keeps every match as its own piece. The `tokenizers` library does the same with a
`Sequence` of `Split(..., "isolated")`, so each list below maps one-to-one.

The DeepSeek-LLM letter class is written with escapes on purpose: pasted as literal characters it
goes through NFC normalisation, which rewrites U+212A (KELVIN SIGN) to `K` and turns the range
U+212A-U+212D into `K`-U+212D, a range swallowing most of the BMP.
"""

from __future__ import annotations

from tokenizers import Regex, pre_tokenizers

# Stage 2 of deepseek-llm: an optional space, then a run of letters from 87 enumerated ranges.
DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)

# ASCII and full-width punctuation, curly quotes, ideographic space and marks.
DEEPSEEK_LLM_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"

# CJK ideographs, a block below them, and Hangul.
DEEPSEEK_LLM_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"

DEEPSEEK_LLM = [
    "[\r\n]",
    DEEPSEEK_LLM_LETTERS,
    DEEPSEEK_LLM_PUNCT,
    "\\s+$",
    DEEPSEEK_LLM_CJK,
    "\\p{N}+",
]

# deepseek-v3: numbers in groups of up to three, then CJK + kana, then a GPT-4-like word regex.
DEEPSEEK_V3 = [
    "\\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+"
    "|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*"
    "|\\s*[\r\n]+"
    "|\\s+(?!\\S)"
    "|\\s+",
]

# `tokenizer.ggml.pre` values llama.cpp maps to the two DeepSeek pre-tokenizer types.
PRE_TOKENIZER_REGEXES: dict[str, list[str]] = {
    "deepseek-llm": DEEPSEEK_LLM,
    "deepseek-v3": DEEPSEEK_V3,
}


def build_pre_tokenizer(pre: str | None, source: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer equal to llama.cpp's for `pre`; ValueError if unknown."""
    regexes = PRE_TOKENIZER_REGEXES.get(pre) if pre is not None else None
    if regexes is None:
        known = ", ".join(sorted(PRE_TOKENIZER_REGEXES))
        raise ValueError(
            f"unsupported tokenizer.ggml.pre {pre!r} in {source} (supported: {known})"
        )
    splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
    # The regexes already split; ByteLevel only maps bytes to the GPT-2 alphabet.
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return pre_tokenizers.Sequence([*splits, byte_level])
