"""The collectives of a compiled XLA program: which, how many, how many bytes, and what they move.

Read from the optimised, partitioned HLO text (`jax.jit(f).lower(...).compile().as_text()`), so the counts
are per device and static (an op inside a loop counts once). Each operand of a collective is classed by
its shape: 'params' (a parameter's shape, whole or one device's shard, in any dimension order: FSDP
gathers and gradient reductions), 'scalars' (loss, metrics, norms) or 'activations' (anything else, e.g.
the gradient of the used rows of the position table). With the batch split over devices and in-batch
groups inside one device, a data-parallel or FSDP step all-gathers no activations.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import jax
import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
         "collective-broadcast")
# `%name = SHAPE op(` with op a collective, possibly async (`-start` / `-done`).
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(KINDS) +
    r")(?P<async>-start|-done)?\(", re.MULTILINE)
_ARRAY = re.compile(r"\b(?P<dtype>pred|[a-z]+\d+\w*)\[(?P<dims>[\d,]*)\]")
_SCALAR_ELEMENTS = 16  # operands at most this big are scalars (loss, metrics, norms)

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Operand:
  dtype: str
  dims: Shape

  @property
  def bytes(self) -> int:
    bits = 8 if self.dtype == "pred" else int(re.search(r"\d+", self.dtype).group())
    return int(np.prod(self.dims, dtype=np.int64)) * bits // 8


@dataclasses.dataclass(frozen=True)
class Collective:
  op: str  # e.g. 'all-gather'
  operands: tuple[Operand, ...]


def collectives(hlo_text: str) -> list[Collective]:
  """Every collective of the program, with the shapes of its results.

  An async pair counts once, by its `-done` (whose shape is the result; a `-start`'s also holds the input).
  """
  found = []
  for match in _INSTRUCTION.finditer(hlo_text):
    if match["async"] == "-start":
      continue
    operands = tuple(Operand(a["dtype"], tuple(int(d) for d in a["dims"].split(",") if d))
                     for a in _ARRAY.finditer(match["shape"]))
    found.append(Collective(match["op"], operands))
  return found


def param_shapes(params, shardings) -> set[Shape]:
  """The global shapes of the parameters and of their per-device shards, dims sorted (XLA may move a
  gradient transposed)."""
  shapes = set()
  for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
    shapes.add(tuple(sorted(leaf.shape)))
    shapes.add(tuple(sorted(sharding.shard_shape(leaf.shape))))
  return shapes


def classify(operand: Operand, params: set[Shape]) -> str:
  """'scalars', 'params' (a parameter's shape, whole or sharded, in any dim order) or 'activations'."""
  if int(np.prod(operand.dims, dtype=np.int64)) <= _SCALAR_ELEMENTS:
    return "scalars"
  return "params" if tuple(sorted(operand.dims)) in params else "activations"


def summarize(found: Iterable[Collective], params: set[Shape]) -> dict:
  """{'by_op': {op: {count, bytes}}, 'by_content': {class: bytes}, 'activation_gathers': n}.

  activation_gathers counts all-gathers and all-to-alls of activation-shaped operands: a batch (or
  activations computed from it) moved between devices.
  """
  by_op: dict[str, dict[str, int]] = {}
  by_content = {"params": 0, "scalars": 0, "activations": 0}
  activation_gathers = 0
  for c in found:
    entry = by_op.setdefault(c.op, {"count": 0, "bytes": 0})
    entry["count"] += 1
    for operand in c.operands:
      entry["bytes"] += operand.bytes
      content = classify(operand, params)
      by_content[content] += operand.bytes
      activation_gathers += content == "activations" and c.op in ("all-gather", "all-to-all")
  return {"by_op": by_op, "by_content": by_content, "activation_gathers": activation_gathers}
