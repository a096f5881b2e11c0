"""llama-mpi: DeepSeek-V2-family MoE serving from GGUF, sharded across MPI ranks.

The code lives in the repository's top-level folders (`models/`, `moe/`, `parallel/`,
`mpi_server/`), installed as `llama_mpi.<folder>`.
"""

import os

# torch_npu registers a torch backend that is autoloaded on `import torch` and fails without
# CANN; it is imported explicitly, and only when an NPU is asked for (parallel/device.py).
os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

__version__ = "0.1.0"
