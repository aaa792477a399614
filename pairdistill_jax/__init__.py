"""PairDistill (pairwise relevance distillation for dense retrieval) in JAX/Flax."""

__version__ = "0.1.0"
