"""Evaluation: the FID Inception network, FID / Inception Score / precision-recall, reference statistics."""
