"""trustsgd-jax: how much private data leaks through what compressed data-parallel SGD puts on the wire."""

__version__ = "0.1.0"
