#!/usr/bin/env python3
"""Logits of llama-mpi and of llama.cpp against transformers, on the same quantized GGUF.

    .venv/bin/python run/compare_logits.py [--ftypes q8_0,q4_k_m,q6_k] [--lcpp-python PY]

Builds the parity tests' 256-wide random DeepSeek-V2 (tests/models/hf_reference.py, variant
``quant``) as each GGUF type, runs transformers in float32 on gguf-py's dequantization of the
file (exactly the weights both runtimes compute with), our model (float32, ``quant_backend``
native: int8 activations in the C kernels) and llama.cpp through llama-cpp-python (a venv
with the package on llama.cpp's shared library: ``LLAMA_CPP_LIB_PATH``), and prints each one's
relative RMS error and argmax agreement over the test sequences. Needs transformers (the
``test`` extra) here; nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LLAMA_CPP_SCRIPT = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, seqs, out = sys.argv[1:4]
llm = Llama(model_path=path, n_ctx=256, logits_all=True, n_threads=2, verbose=False,
            kv_overrides={"deepseek2.attention.q_lora_rank": 0})
res = []
for s in json.load(open(seqs)):
    llm.reset()
    llm.eval(s)
    res.append(np.array(llm.scores[: len(s)]).tolist())
json.dump(res, open(out, "w"))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ftypes", default="q8_0,q4_k_m,q6_k")
    ap.add_argument("--lcpp-python", default=os.environ.get("LCPP_PY",
                                                            "/tmp/lcpp-venv/bin/python"))
    args = ap.parse_args()

    import torch

    from llama_mpi.models.gguf.builtin_vocab import builtin_vocab
    from llama_mpi.models.gguf.hf_to_gguf import convert
    from llama_mpi.models.loader import load_model
    from tests.models.conftest import SEQS, batch_for, num_blocks
    from tests.models.hf_reference import hf_logits, hf_model, load_dequantized

    hf = hf_model("quant")
    tmp = Path(tempfile.mkdtemp(prefix="compare-logits-"))
    (tmp / "seqs.json").write_text(json.dumps(SEQS))
    (tmp / "lcpp.py").write_text(LLAMA_CPP_SCRIPT)
    print("| file | runtime | rel. RMS error | argmax agreement |\n|---|---|---|---|")
    for ftype in args.ftypes.split(","):
        path = tmp / f"quant-{ftype}.gguf"  # llama.cpp needs a vocabulary in the file
        convert(hf.state_dict(), hf.config.to_dict(), path, ftype=ftype,
                vocab=builtin_vocab(hf.config.vocab_size))
        deq = type(hf)(hf.config).eval()
        load_dequantized(deq, path)
        ref = torch.cat([hf_logits(deq, s) for s in SEQS])
        model = load_model(path, dtype="float32", quant_backend="native")
        runs = {"llama-mpi": model(batch_for(SEQS), model.make_kv_pool(num_blocks(SEQS), 4))}
        proc = subprocess.run([args.lcpp_python, str(tmp / "lcpp.py"), str(path),
                               str(tmp / "seqs.json"), str(tmp / "lcpp.json")],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            runs["llama.cpp"] = torch.cat([torch.tensor(x) for x in
                                           json.loads((tmp / "lcpp.json").read_text())])
        else:
            print(f"llama.cpp failed ({args.lcpp_python}):\n{proc.stderr[-1500:]}",
                  file=sys.stderr)
        for name, got in runs.items():
            rel = ((got - ref).norm() / ref.norm()).item()
            agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
            print(f"| {ftype.upper()} | {name} | {100 * rel:.1f} % | {100 * agree:.1f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
