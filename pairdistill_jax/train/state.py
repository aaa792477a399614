"""The train state, the optimizer, and building both directly in sharded form."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pairdistill_jax import sharding
from pairdistill_jax.errors import ConfigError


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to optim.lr, then linear decay to 0 at train.steps (HF linear schedule)."""
  optim_cfg, steps = config.optim, config.train.steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, optim_cfg.lr, max(optim_cfg.warmup_steps, 1)),
       optax.linear_schedule(optim_cfg.lr, 0.0, max(steps - optim_cfg.warmup_steps, 1))],
      [optim_cfg.warmup_steps])


def optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the warmup/decay schedule (the paper's optimizer)."""
  optim_cfg = config.optim
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.adamw(learning_rate(config), b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                  weight_decay=optim_cfg.weight_decay))


def init_inputs(config: ml_collections.ConfigDict) -> tuple[np.ndarray, ...]:
  """Dummy (q_ids, q_mask, d_ids, d_mask) of the configured lengths, for `model.init`."""
  model_cfg = config.model
  q = np.ones((1, model_cfg.query_maxlen), np.int32)
  d = np.ones((1, model_cfg.doc_maxlen), np.int32)
  return q, q, d, d


def init_params(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array, *, boxed: bool = False):
  """Fresh parameters (`nn.LogicallyPartitioned` boxes carrying axis names when `boxed`)."""
  params = model.init({"params": rng, "dropout": rng}, *init_inputs(config))["params"]
  return params if boxed else nn.meta.unbox(params)


def init_boxed(model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               rng: jax.Array) -> TrainState:
  """A fresh train state whose parameters are `nn.LogicallyPartitioned` boxes (they carry axis names)."""
  params = init_params(model, config, rng, boxed=True)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def create(model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
           mesh: jax.sharding.Mesh, rng: jax.Array) -> tuple[TrainState, TrainState]:
  """Initialises the state directly in sharded form; returns (state, its shardings).

  Parameters are created by a jit whose out_shardings follow the logical-axis rules, so no device ever
  holds more than its shard.
  """
  init = functools.partial(init_boxed, model, tx, config)
  shardings = sharding.tree_shardings(jax.eval_shape(init, rng), mesh, sharding.rules(config))
  state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def with_pretrained(state: TrainState, shardings: TrainState, pretrained: Mapping[str, Any]) -> TrainState:
  """Replaces top-level parameter subtrees (e.g. 'bert') with pretrained numpy arrays, sharded in place.

  Adam's moments start at zero whatever the parameter values, so the optimizer state stays as it is.
  """
  params = dict(state.params)
  for name, subtree in pretrained.items():
    if name not in params:
      raise ConfigError(f"pretrained weights for {name!r} have no place in the model (it has {sorted(params)})")
    expected = _shapes(params[name])
    found = _shapes(subtree)
    if expected != found:
      diff = sorted(set(expected.items()) ^ set(found.items()))[:4]
      raise ConfigError(f"pretrained weights for {name!r} do not match the model's parameters "
                       f"(first differences, as (path, shape): {diff}); check that the config's model "
                       f"shape matches the checkpoint")
    params[name] = jax.device_put(subtree, shardings.params[name])
  return state.replace(params=params)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}

