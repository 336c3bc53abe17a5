"""Training of the transformer on tokens of the frozen tokenizer."""
