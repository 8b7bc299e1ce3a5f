"""laperm: train neural networks by reconnecting their weights (Lookahead Permutation)."""

__version__ = "0.1.0"
