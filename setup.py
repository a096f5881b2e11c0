"""llama-mpi: serve DeepSeek-V2-family MoE models from GGUF across MPI ranks.

The top-level folders `models/`, `moe/`, `parallel/` and `mpi_server/` install as
subpackages of one import package, `llama_mpi`, so nothing generic lands in site-packages.
"""

from setuptools import setup

SUBPACKAGES = ["models", "moe", "parallel", "mpi_server"]
# the folders inside them, each its own package
NESTED = ["models.gguf", "models.tokenizer", "models.kernels", "mpi_server.engine",
          "mpi_server.http", "mpi_server.structured"]

setup(
    name="llama-mpi",
    version="0.1.0",
    description="DeepSeek-V2 MoE serving from GGUF with expert and tensor parallelism over MPI",
    python_requires=">=3.10",
    packages=["llama_mpi", "llama_mpi.configs"] + [f"llama_mpi.{p}" for p in SUBPACKAGES + NESTED],
    package_dir={"llama_mpi": "llama_mpi", **{f"llama_mpi.{p}": p for p in SUBPACKAGES},
                 "llama_mpi.configs": "configs"},
    package_data={"llama_mpi.configs": ["*.yaml"], "llama_mpi.models.kernels": ["*.c", "*.h"]},
    install_requires=[
        "torch>=2.3",  # install torch==2.13.0 first (README): an unpinned torch pulls CUDA
        "numpy",
        "pyyaml",
        "gguf>=0.10",
        "mpi4py",
        "fastapi",
        "uvicorn",
        "tokenizers>=0.19",
        "jinja2",
        "pydantic>=2",
        "prometheus-client",
        "llguidance>=1.9",  # constrained decoding (mpi_server/structured); no dependencies
    ],
    extras_require={
        "mpi": ["mpich"],
        "npu": ["torch-npu==2.13.0"],
        "test": [
            "pytest",
            "hypothesis",
            "jsonschema",
            "transformers>=5.23",
            "safetensors",
            "openai",
            "httpx",
            "ruff",
            "mypy",
        ],
    },
    entry_points={
        "console_scripts": [
            "llama-mpi-generate=llama_mpi.mpi_server.generate_cli:main",
            "llama-mpi-build-model=llama_mpi.models.gguf.builder:main",
            "llama-server=llama_mpi.mpi_server.cli:main",
            "llama-mpi-server=llama_mpi.mpi_server.mpi_cli:main",
        ]
    },
)
