"""Request fields -> validated ``SamplingParams``, one per choice."""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
from llama_mpi.mpi_server.http.errors import bad_request, from_value_error

# Request field -> SamplingParams field, for the ones that copy across unchanged.
_DIRECT = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "n",
    "ignore_eos",
    "skip_special_tokens",
)


def pick_max_tokens(*candidates: tuple[str, int | None]) -> tuple[str, int | None]:
    """First given of (name, value); llama.cpp's ``n_predict`` < 0 means "no limit"."""
    for name, value in candidates:
        if value is None:
            continue
        if name == "n_predict" and value < 0:
            return name, None
        return name, value
    return "max_tokens", None


def normalize_stop(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    return [s for s in stops if s]  # an empty stop string would end every generation at once


SEED_MAX = (1 << 64) - 1  # torch.Generator.manual_seed takes [-2^63, 2^64 - 1]
LOGIT_BIAS_MAX = 100.0  # OpenAI's range: [-100, 100]
_TOKEN_ID = re.compile(r"[0-9]{1,12}")  # plain ASCII decimal (no sign, spaces, "_", other digits)


def check_seed(seed: int | None) -> int | None:
    """A seed in [0, 2^64 - 1]; ``-1`` means "random" (llama.cpp's default) and becomes None."""
    if seed is None or seed == -1:
        return None
    if not 0 <= seed <= SEED_MAX:
        raise bad_request("seed: must be an integer in [0, 2^64 - 1], or -1 for a random seed",
                          "seed")
    return seed


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    """``{"<token id>": bias}`` -> ``{id: bias}``: ids in the vocabulary, biases finite in
    [-100, 100]."""
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not _TOKEN_ID.fullmatch(key):
            raise bad_request(f"logit_bias: key {key!r} is not a token id (a decimal number)",
                              "logit_bias")
        tok = int(key)
        if tok >= vocab_size:
            raise bad_request(f"logit_bias: token id {tok} is outside the vocabulary of "
                              f"{vocab_size}", "logit_bias")
        value = float(value)
        if not (math.isfinite(value) and -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX):
            raise bad_request(f"logit_bias: the bias of token {tok} must be a number in "
                              "[-100, 100]", "logit_bias")
        out[tok] = value
    return out


def build_params(
    fields: dict[str, Any],
    *,
    max_tokens: tuple[str, int | None],
    prompt_len: int,
    max_model_len: int,
    vocab_size: int,
    prompt_param: str = "prompt",
) -> SamplingParams:
    """Check the prompt fits, fill the token budget, and validate every sampling value.

    ``fields`` holds request values by SamplingParams name (None = use the default).
    """
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens, but the prompt "
            f"has {prompt_len} tokens.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    name, limit = max_tokens
    room = max_model_len - prompt_len
    if limit is not None and limit <= 0:
        raise bad_request(f"{name}: must be at least 1", param=name)
    kwargs: dict[str, Any] = {k: fields[k] for k in _DIRECT if fields.get(k) is not None}
    kwargs["seed"] = check_seed(fields.get("seed"))
    top_k = kwargs.get("top_k")
    if top_k is not None and vocab_size > 0 and top_k > vocab_size:
        kwargs["top_k"] = vocab_size  # the same filter, and no int64 overflow in the sampler
    # Absent limit: run to EOS or the end of the context; a larger one is clamped the same way.
    kwargs["max_tokens"] = room if limit is None else min(limit, room)
    penalty = fields.get("repetition_penalty")
    if penalty is None:
        penalty = fields.get("repeat_penalty")
    if penalty is not None:
        kwargs["repetition_penalty"] = penalty
    kwargs["stop"] = normalize_stop(fields.get("stop"))
    kwargs["logit_bias"] = parse_logit_bias(fields.get("logit_bias"), vocab_size)
    if fields.get("logprobs"):
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = int(fields.get("top_logprobs") or 0)
    params = SamplingParams(**kwargs)
    try:
        params.validate(vocab_size)
    except ValueError as exc:
        raise from_value_error(exc) from exc
    return params


def per_choice(params: SamplingParams) -> list[SamplingParams]:
    """``n`` single-choice params; with a seed, choice ``i`` uses ``seed + i`` modulo 2^64
    (distinct yet reproducible, and always a seed ``check_seed`` accepts)."""
    out = []
    for i in range(params.n):
        seed = None if params.seed is None else (params.seed + i) & SEED_MAX
        out.append(dataclasses.replace(params, n=1, seed=seed))
    return out
