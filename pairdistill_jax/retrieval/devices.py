"""This process's devices as a 1-D mesh, and fixed-shape row padding for the jitted encode/score functions.

Retrieval work is split across hosts by the caller (each host takes its own corpus chunks); within a host,
rows of a batch are split over the local devices along the mesh axis 'rows'.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

ROWS = "rows"


def local_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh ('rows',) over the devices this process addresses."""
  devices = jax.local_devices()
  return jax.make_mesh((len(devices),), (ROWS,), axis_types=(AxisType.Auto,), devices=devices)


def row_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The leading dimension split over the mesh; the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(ROWS))


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def width_bucket(length: int, maxlen: int) -> int:
  """Token widths in steps of 32 up to 128, then of 64, capped at maxlen: few compiled shapes, little padding."""
  return min(maxlen, round_up(max(length, 1), 32 if length <= 128 else 64))


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """`x` with its last row repeated until it has `rows` rows (padding rows are discarded by the caller)."""
  missing = rows - x.shape[0]
  if missing < 0:
    raise ValueError(f"cannot pad {x.shape[0]} rows down to {rows}")
  return np.concatenate([x, np.repeat(x[-1:], missing, axis=0)]) if missing else x
