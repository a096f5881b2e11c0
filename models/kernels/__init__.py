"""The compute kernels: the C sources with their loader, and the quantized and bf16 ops on them."""
