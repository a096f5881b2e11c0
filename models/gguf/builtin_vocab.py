"""A small byte-level BPE vocabulary of our own, as GGUF `tokenizer.*` metadata.

256 GPT-2 byte tokens + merges learned deterministically (greedy pair counts, ties broken by
the pair itself) from a fixed built-in text, then DeepSeek's BOS/EOS control tokens and
`[PAD{i}]` UNUSED padding up to the model's vocab size. Values are Python natives keyed by
GGUF key name, the shape `Tokenizer.from_metadata(fields)` consumes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from functools import lru_cache
from typing import Any

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
NORMAL, CONTROL, UNUSED = 1, 3, 5  # gguf.TokenType values
# DeepSeek-V2(-Lite)-Chat tokenizer_config.json template (reference doc section 4)
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Fixed training text: chat-ish English plus a little Python, so common words and code
# fragments become single tokens. Changing it changes every built-in model's vocabulary.
TRAINING_TEXT = """User: Hello! Can you tell me what the weather is like today?
Assistant: I do not have access to live weather data, but I can help you find a forecast.
User: What is the capital of France? The capital of France is Paris.
Assistant: The answer is simple: the model reads the prompt, then it writes the next token.
A mixture of experts model routes every token to a small number of experts. The router
computes a score for each expert, selects the top experts, and combines their outputs.
Attention lets each position look at the previous positions in the sequence. The key and
value cache stores the compressed latent state for every token that has been processed.
The quick brown fox jumps over the lazy dog. The lazy dog sleeps in the sun all day long.
This is a test of the system. These are the tests that we run on the server every day.
Please write a short story about a robot who learns to paint pictures of the sea.
Once upon a time there was a little robot that wanted to see the world and the stars.
def forward(self, hidden_states, position_ids):
    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states = self.self_attn(hidden_states, position_ids)
    hidden_states = residual + hidden_states
    return hidden_states

for i in range(len(tokens)):
    if tokens[i] == self.eos_token_id:
        break
    print(f"token {i}: {tokens[i]}")

import torch
from typing import Optional
class Config:
    def __init__(self, hidden_size: int = 2048, num_layers: int = 27) -> None:
        self.hidden_size = hidden_size
        self.num_layers = num_layers
The server returns a response with the generated text and the number of tokens used.
Numbers like 1, 2, 3, 10, 42 and 2024 are split into single digits by the tokenizer.
"""

# Training split mirrors the deepseek-llm pre-tokenizer closely enough that learned merges
# never need to cross its boundaries: newlines alone, letter runs, punctuation runs, digits.
_PIECES = re.compile(r"[\r\n]|\s?[A-Za-z]+|\s?[!-/:-@\[-`{-~]+|\d|\s+")


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte -> printable character table, indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


@lru_cache(maxsize=8)
def learn_merges(n_merges: int, text: str = TRAINING_TEXT) -> tuple[tuple[str, str], ...]:
    """Greedy BPE on `text`: repeatedly merge the most frequent pair until `n_merges`."""
    alpha = byte_alphabet()
    words = Counter(tuple(alpha[b] for b in p.encode()) for p in _PIECES.findall(text))
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pr: (-pairs[pr], pr))  # deterministic tie-break
        merges.append(best)
        words = Counter({_apply(word, best): c for word, c in words.items()})
    return tuple(merges)


def _apply(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def builtin_vocab(vocab_size: int = 1024, n_merges: int = 400) -> dict[str, Any]:
    """Tokenizer metadata for a model with `vocab_size` rows (>= 258)."""
    if vocab_size < 258:
        raise ValueError("vocab_size must hold 256 byte tokens plus BOS and EOS")
    merges = learn_merges(min(n_merges, vocab_size - 258))
    # two merges can spell the same string ("a bc", "ab c"); each string gets one id
    tokens = list(dict.fromkeys([*byte_alphabet(), *(a + b for a, b in merges)]))
    types = [NORMAL] * len(tokens)
    bos_id = len(tokens)
    tokens += [BOS, EOS]
    types += [CONTROL, CONTROL]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab_size)]
    types += [UNUSED] * (vocab_size - len(types))
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "deepseek-llm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": bos_id,
        "tokenizer.ggml.eos_token_id": bos_id + 1,
        "tokenizer.ggml.padding_token_id": bos_id + 1,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def vocab_from_gguf(path: str | os.PathLike, *, default_chat_template: str | None = CHAT_TEMPLATE
                    ) -> dict[str, Any]:
    """All `tokenizer.*` fields of a GGUF (e.g. a vocab-only file) as Python values.

    Vocab-only files from llama.cpp carry no chat template; `default_chat_template` fills it in
    (pass None to copy the file exactly).
    """
    from llama_mpi.models.tokenizer.tokenizer import read_tokenizer_fields

    fields = read_tokenizer_fields(path)
    if default_chat_template is not None:
        fields.setdefault("tokenizer.chat_template", default_chat_template)
    return fields
