"""GGUF file tools: the reader, the HF-to-GGUF converter, the test-model builder and its parts."""
