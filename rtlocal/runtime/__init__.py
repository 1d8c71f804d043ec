"""The runtime: load a GGUF with refusal tokens and decide, per answer, whether to refuse (no torch)."""
