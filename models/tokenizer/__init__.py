"""The tokenizer family: GGUF vocabularies, detokenizer, pre-tokenizers and chat templates."""
