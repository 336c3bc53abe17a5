"""Training: the driver every trainer shares, the transformer's and the tokenizer's steps, optimizers, checkpoints and exports."""
