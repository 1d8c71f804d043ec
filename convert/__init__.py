"""Merge a PEFT adapter into its base and export GGUF with the refusal tokens as CONTROL tokens."""
