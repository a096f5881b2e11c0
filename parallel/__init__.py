"""Parallel runtime: rank bootstrap, device choice, communicators and fail-fast guards.

Importing this package sets TORCH_DEVICE_BACKEND_AUTOLOAD=0 before anything here imports
torch: with torch_npu installed but no CANN, torch's backend autoload makes a plain
`import torch` raise. NPU support is loaded explicitly by `device.import_torch_npu()`.
The setting only helps if this package is imported before torch; `llama_mpi/__init__.py`
should set it too so that every entry point is covered.
"""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")
