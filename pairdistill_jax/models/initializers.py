"""Parameter initialisers that carry logical axis names (for `pairdistill_jax.sharding`), shared by the BERT and
T5 modules."""

from __future__ import annotations

import flax.linen as nn

Axes = tuple[str | None, ...]  # one logical axis name (or None: never split) per parameter dimension


def param_init(init: nn.initializers.Initializer, axes: Axes) -> nn.initializers.Initializer:
  """`init` boxed with the logical axis names `axes`."""
  return nn.with_logical_partitioning(init, axes)
