"""llama-mpi: DeepSeek-V2-family MoE serving from GGUF, sharded across MPI ranks.

The code lives in the repository's top-level folders (`models/`, `moe/`, `parallel/`,
`mpi_server/`), installed as `llama_mpi.<folder>`.
"""

__version__ = "0.1.0"
