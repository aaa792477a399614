"""Sharded teacher inference: items bucketed by length into fixed-shape batches on a (data, fsdp, tensor) mesh.

A teacher item is a dict of unpadded 1-D int32 token fields. Each field is padded to its own length rounded
up to `bucket_multiple`, so an item's padded shape depends on the item alone; batches hold
`batch_per_device` rows per batch shard. Every device therefore runs the same shapes whatever the number of
devices, and an item's score does not depend on how many devices (or hosts) share the work.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from pairdistill_jax import sharding

Item = Mapping[str, np.ndarray]
ApplyFn = Callable[[Any, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass
class Teacher:
  """A loaded teacher.

  Attributes:
    name: a label for logs.
    encode: texts -> items; each text tuple is (query, passage) or (query, passage_i, passage_j).
    apply: (params, padded batch of fields [B, L]) -> one float32 score per row; jittable.
    params: the parameters on the host (numpy).
    abstract: `jax.eval_shape` of the module's init params, boxed with logical axis names.
    pad_values: the padding id of each field (0 where absent).
  """

  name: str
  encode: Callable[[Sequence[tuple[str, ...]]], list[dict[str, np.ndarray]]]
  apply: ApplyFn
  params: Any
  abstract: Any
  pad_values: Mapping[str, int] = dataclasses.field(default_factory=dict)


def bucket_key(item: Item, multiple: int) -> tuple[tuple[str, int], ...]:
  """(field, padded width) of every field: the shape group of the item."""
  return tuple((name, -(-max(len(v), 1) // multiple) * multiple) for name, v in sorted(item.items()))


def pad_batch(items: Sequence[Item], key: tuple[tuple[str, int], ...], rows: int,
              pad_values: Mapping[str, int]) -> dict[str, np.ndarray]:
  """Stacks items of one bucket into [rows, width] arrays; missing rows repeat the last item."""
  batch = {}
  for name, width in key:
    out = np.full((rows, width), pad_values.get(name, 0), np.int32)
    for r in range(rows):
      value = items[min(r, len(items) - 1)][name]
      out[r, :len(value)] = value
    batch[name] = out
  return batch


def teacher_mesh(teacher_cfg: ml_collections.ConfigDict,
                 devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The teachers' own mesh, `config.teacher.mesh`, over `devices` (default: all)."""
  try:
    return sharding.make_mesh(ml_collections.ConfigDict({"mesh": teacher_cfg.mesh}), devices)
  except ValueError as e:
    raise ValueError(f"teacher.mesh: {e}") from None


def _to_global(x: np.ndarray, s: jax.sharding.Sharding) -> jax.Array:
  """A host array that every process holds whole -> a global array; each process copies only the pieces its
  devices hold (multi-host safe)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, s, lambda index: x[index])


class ShardedScorer:
  """Scores items with a teacher whose parameters are laid out over `mesh` by the logical rules."""

  def __init__(self, teacher: Teacher, mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
               batch_per_device: int, bucket_multiple: int):
    self.teacher, self.mesh, self.bucket_multiple = teacher, mesh, bucket_multiple
    self.rows = batch_per_device * mesh.shape["data"] * mesh.shape["fsdp"]
    param_sh = sharding.tree_shardings(teacher.abstract, mesh, rules)
    self.params = jax.tree.map(_to_global, teacher.params, param_sh)
    self._batch_sh = sharding.batch_sharding(mesh, rules)

    def run(params, batch):
      with nn.logical_axis_rules(rules):
        return teacher.apply(params, batch)

    self._run = jax.jit(run, in_shardings=(param_sh, self._batch_sh),
                        out_shardings=sharding.replicated(mesh))
    self.items_scored, self.seconds = 0, 0.0

  def score(self, items: Sequence[Item], on_batch: Callable[[int], object] = lambda n: None) -> np.ndarray:
    """One float32 score per item, in order; `on_batch(rows)` as each batch's scores arrive."""
    start = time.perf_counter()
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
      groups.setdefault(bucket_key(item, self.bucket_multiple), []).append(i)
    scores = np.zeros(len(items), np.float32)
    pending = []  # (item indices, device scores): dispatch runs ahead while the host builds batches
    with jax.set_mesh(self.mesh):
      for key in sorted(groups, key=lambda k: tuple(w for _, w in k)):
        indices = groups[key]
        for begin in range(0, len(indices), self.rows):
          chunk = indices[begin:begin + self.rows]
          batch = pad_batch([items[i] for i in chunk], key, self.rows, self.teacher.pad_values)
          global_batch = {name: _to_global(x, self._batch_sh) for name, x in batch.items()}
          pending.append((chunk, self._run(self.params, global_batch)))
    for chunk, out in pending:
      scores[chunk] = np.asarray(out.addressable_shards[0].data)[:len(chunk)]
      on_batch(len(chunk))
    self.items_scored += len(items)
    self.seconds += time.perf_counter() - start
    return scores
