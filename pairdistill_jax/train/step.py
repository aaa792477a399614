"""The PairDistill train step: student scores -> losses -> gradients (accumulated, or cached: grad_cache.py) -> AdamW.

`make_train_step` returns `step(state, batch, rng) -> (state, metrics)` compiled with `jax.jit`, its
shardings stated (state as the logical rules say, batch split along 'batch') and the state donated. Batches
differ in shape only by their passage width (data.doc_widths), so jit's cache holds one program per width;
each trace logs its width, so that a compile in the middle of training is visible and counted.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pairdistill_jax import config_lib, sharding
from pairdistill_jax.train import grad_cache
from pairdistill_jax.train.forward import Batch, compute_loss, split_micro_batches
from pairdistill_jax.train.state import TrainState, learning_rate
# (params, batch, rng) -> ((loss, metrics), gradients) of the global batch
GradientFn = Callable[[Any, Batch, jax.Array], tuple[tuple[jax.Array, dict], Any]]


def accumulated_gradients(params, batch: Batch, rng: jax.Array, *, model: nn.Module,
                          config: ml_collections.ConfigDict) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, metrics), gradients) of the global batch, accumulated over config.train.grad_accum micro-batches.

  As the original, the accumulated gradient is the mean of the micro-batch gradients (each micro-batch
  loss divided by the number of micro-batches); micro-batch i draws its dropout from fold_in(rng, i).
  """
  k = config.train.grad_accum
  grad_fn = jax.value_and_grad(functools.partial(compute_loss, model, config), has_aux=True)
  if k == 1:
    return grad_fn(params, batch, rng)

  def accumulate(carry, xs):
    micro, index = xs
    (_, micro_metrics), micro_grads = grad_fn(params, micro, jax.random.fold_in(rng, index))
    return jax.tree.map(jnp.add, carry, (micro_grads, micro_metrics)), None

  micro_batches = split_micro_batches(batch, k)
  (_, metrics_shape), grads_shape = jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], micro_batches), rng)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, metrics_shape))
  (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(k)))
  grads, metrics = jax.tree.map(lambda x: x / k, (grads, metrics))
  return (metrics["loss"], metrics), grads


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, gradients: GradientFn,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               param_shardings) -> tuple[TrainState, dict]:
  """One optimizer step over the global batch with the gradients that `gradients` computes.

  A non-finite loss or gradient leaves the state unchanged and reports `finite = 0`.
  """
  doc_width = batch["d_ids"].shape[-1]
  logging.info("Tracing the train step for documents of width %d (it compiles once per width)", doc_width)
  rng = jax.random.fold_in(rng, state.step)
  (_, metrics), grads = gradients(state.params, batch, rng)
  grads = jax.lax.with_sharding_constraint(grads, param_shardings)

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                           state.replace(step=state.step + 1))
  metrics = dict(metrics, grad_norm=grad_norm, lr=learning_rate(config)(state.step),
                 finite=finite.astype(jnp.float32), doc_width=jnp.float32(doc_width))
  return new_state, metrics


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh, state_shardings: TrainState):
  """The train step compiled for `mesh`: donated, sharded state in and out; batch split along 'batch'.

  Its gradients are those of the global batch, accumulated over train.grad_accum micro-batches, or with
  train.grad_cache cached per chunk of train.grad_cache_chunk queries (grad_cache.py).
  """
  if config.train.grad_cache:
    chunk = config_lib.grad_cache_chunk(config.train, mesh.shape["data"] * mesh.shape["fsdp"])
    gradients = functools.partial(grad_cache.gradients, model=model, config=config, chunk=chunk)
  else:
    gradients = functools.partial(accumulated_gradients, model=model, config=config)
  return compile_step(gradients, tx, config, mesh, state_shardings)


def compile_step(gradients: GradientFn, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh, state_shardings: TrainState):
  """`train_step` with `gradients`, jitted with the step's shardings and the state donated."""
  batch_sh = sharding.batch_sharding(mesh, sharding.rules(config))
  step = functools.partial(train_step, gradients=gradients, tx=tx, config=config,
                           param_shardings=state_shardings.params)
  return jax.jit(step, in_shardings=(state_shardings, batch_sh, sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
