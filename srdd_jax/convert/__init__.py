"""PyTorch state dicts -> Flax parameters."""
