"""Mesh construction and logical-axis rules: the one place logical names become `NamedSharding`s.

Parameters carry logical axis names ('vocab', 'embed', 'heads', 'mlp'); batches are sharded along 'batch'.
`config.sharding_rules` maps them to the mesh axes ('data', 'fsdp', 'tensor') of `config.mesh`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from pairdistill_jax import config_lib

MESH_AXES = ("data", "fsdp", "tensor")
Rules = tuple[tuple[str, Any], ...]


def make_mesh(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` over `devices` (default: all devices)."""
  devices = list(devices if devices is not None else jax.devices())
  axes = config_lib.mesh_shape(config, len(devices))
  return jax.make_mesh(tuple(axes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def rules(config: ml_collections.ConfigDict) -> Rules:
  """`config.sharding_rules` as the tuple of (logical, mesh axes) pairs that flax expects."""
  def mesh_axes(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
  return tuple((str(name), mesh_axes(value)) for name, value in config.sharding_rules)


def tree_shardings(abstract_boxed_tree: Any, mesh: jax.sharding.Mesh, logical_rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are `nn.LogicallyPartitioned` boxes (or plain, replicated)."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules)


def batch_sharding(mesh: jax.sharding.Mesh, logical_rules: Rules) -> NamedSharding:
  """Leading (batch) dimension split over the mesh axes that 'batch' maps to; the rest replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), logical_rules))


def shard_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Host-local numpy arrays (this process's rows) -> global arrays split along the batch dimension."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
