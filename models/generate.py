"""``llama-mpi-generate``: offline generation from a GGUF, for smoke tests and quick checks.

    llama-mpi-generate --model X.gguf --prompt "Hello" -n 32 [--temp 0.8 --seed 1]

Runs one sequence through the paged cache (prefill, then one token per step) and prints the
text, then prompt and decode speed in tokens per second.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from llama_mpi.models.deepseek_v2 import DeepseekV2
from llama_mpi.models.forward_batch import ForwardBatch

BLOCK_SIZE = 16


def generate(model: DeepseekV2, prompt_ids: list[int], n_tokens: int, temperature: float = 0.0,
             seed: int | None = None, stop_ids: set[int] | None = None
             ) -> tuple[list[int], float, float]:
    """Returns (new token ids, prompt seconds, decode seconds). Greedy at temperature 0."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    total = len(prompt_ids) + n_tokens
    table = list(range(-(-total // BLOCK_SIZE)))
    pool = model.make_kv_pool(len(table), BLOCK_SIZE)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    t0 = time.perf_counter()
    logits = model(ForwardBatch.build([(prompt_ids, 0, table)], BLOCK_SIZE), pool)
    t1 = time.perf_counter()
    while len(out) < n_tokens:
        if temperature <= 0:
            tok = int(logits[0].argmax())
        else:
            probs = torch.softmax(logits[0] / temperature, dim=-1)
            tok = int(torch.multinomial(probs, 1, generator=gen))
        out.append(tok)
        if (stop_ids and tok in stop_ids) or len(out) == n_tokens:
            break
        cached = len(prompt_ids) + len(out) - 1
        logits = model(ForwardBatch.build([([tok], cached, table)], BLOCK_SIZE), pool)
    return out, t1 - t0, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llama-mpi-generate", description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True, help="GGUF file (architecture deepseek2)")
    ap.add_argument("-p", "--prompt", default="Hello")
    ap.add_argument("-n", "--n-predict", type=int, default=32)
    ap.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--no-mla", action="store_true", help="naive MLA instead of absorbed")
    ap.add_argument("--ignore-eos", action="store_true")
    args = ap.parse_args(argv)
    from llama_mpi.models.gguf.gguf_file import GGUFError
    from llama_mpi.models.loader import load_model
    from llama_mpi.models.tokenizer.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        tok = Tokenizer.from_gguf(args.model)
        model = load_model(args.model, dtype=args.dtype, absorbed_mla=not args.no_mla)
        ids = tok.encode(args.prompt)
        stop = None if args.ignore_eos else tok.eos_ids
        new, t_prompt, t_decode = generate(model, ids, args.n_predict, args.temp, args.seed, stop)
    except (GGUFError, ValueError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(tok.decode(ids, skip_special_tokens=True) + tok.decode(new))
    n_dec = max(len(new) - 1, 1)
    print(f"\nprompt: {len(ids)} tokens, {len(ids) / t_prompt:.1f} tokens/s | "
          f"decode: {len(new)} tokens, {n_dec / max(t_decode, 1e-9):.1f} tokens/s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
