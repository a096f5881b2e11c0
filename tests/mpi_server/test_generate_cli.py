"""``llama-mpi-generate`` runs on the serving engine: its greedy text is the reference decode
loop's, and a bad file is one line."""

from __future__ import annotations

from llama_mpi.models.gguf.builder import build_model
from llama_mpi.models.loader import load_model
from llama_mpi.models.tokenizer.tokenizer import Tokenizer
from llama_mpi.mpi_server.generate_cli import main
from tests.models.reference_decode import generate


def test_greedy_text_equals_the_reference_loop(tmp_path, capsys) -> None:
    path = build_model(tmp_path / "tiny.gguf", preset="tiny", ftype="f32", seed=4)
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode("The capital of France is")
    want, _, _ = generate(load_model(path), ids, 12)
    assert main(["-m", str(path), "-p", "The capital of France is", "-n", "12",
                 "--ignore-eos"]) == 0
    out = capsys.readouterr()
    assert out.out.rstrip("\n") == tok.decode(ids, skip_special_tokens=True) + tok.decode(want)
    assert "decode: 12 tokens" in out.err


def test_a_missing_file_is_one_line(capsys) -> None:
    assert main(["-m", "/nonexistent/x.gguf"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "llama-mpi-generate: /nonexistent/x.gguf: no such file"
