"""``llama-mpi-generate``: offline generation from a GGUF through the serving engine.

    llama-mpi-generate --model X.gguf --prompt "Hello" -n 32 [--temp 0.8 --seed 1]

The same engine, scheduler, sampler and detokenizer as the server, stepped in this thread
(no HTTP); prints the text, then prompt and decode speed in tokens per second.
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="llama-mpi-generate", description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", required=True, help="GGUF file (architecture deepseek2)")
    ap.add_argument("-p", "--prompt", default="Hello")
    ap.add_argument("-n", "--n-predict", type=int, default=32)
    ap.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    ap.add_argument("-t", "--threads", type=int, default=-1)
    ap.add_argument("--no-mla", action="store_true", help="naive MLA instead of absorbed")
    ap.add_argument("--ignore-eos", action="store_true")
    args = ap.parse_args(argv)
    if args.n_predict < 1:
        ap.error("-n must be at least 1")
    from llama_mpi.models.tokenizer.tokenizer import Tokenizer
    from llama_mpi.mpi_server.config import ConfigError, ServerConfig, check_value
    from llama_mpi.mpi_server.engine.engine import Engine, EngineConfig
    from llama_mpi.mpi_server.engine.sampling_params import SamplingParams
    from llama_mpi.mpi_server.engine_factory import local_executor
    from llama_mpi.mpi_server.settings import engine_options

    try:
        config = ServerConfig(model=args.model, dtype=check_value("dtype", args.dtype),
                              enable_mla=not args.no_mla, n_threads=args.threads,
                              n_parallel=1)
        tok = Tokenizer.from_gguf(args.model)
        ids = tok.encode(args.prompt)
        config.n_ctx = max(64, len(ids) + args.n_predict + 1)
        engine = Engine(local_executor(config), tok, EngineConfig(**engine_options(config)))
        params = SamplingParams(max_tokens=args.n_predict, temperature=args.temp,
                                seed=args.seed, ignore_eos=args.ignore_eos)
        engine.add_request("generate", ids, params)
        text, t0, t_first, n_out = "", time.perf_counter(), None, 0
        while engine.has_unfinished():
            for out in engine.step():
                text += out.new_text
                n_out += len(out.new_token_ids)
                if t_first is None and out.new_token_ids:
                    t_first = time.perf_counter()
        t_end = time.perf_counter()
    except (ConfigError, ValueError, OSError, MemoryError) as e:
        print(f"llama-mpi-generate: {e}", file=sys.stderr)
        return 1
    print(tok.decode(ids, skip_special_tokens=True) + text)
    t_first = t_first or t_end
    print(f"\nprompt: {len(ids)} tokens, {len(ids) / max(t_first - t0, 1e-9):.1f} tokens/s | "
          f"decode: {n_out} tokens, {max(n_out - 1, 1) / max(t_end - t_first, 1e-9):.1f} "
          f"tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
