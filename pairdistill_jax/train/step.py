"""The PairDistill train step: student scores -> losses -> gradients (accumulated) -> AdamW update.

`make_train_step` returns `step(state, batch, rng) -> (state, metrics)` compiled with `jax.jit`, its
shardings stated (state as the logical rules say, batch split along 'batch') and the state donated. Batches
differ in shape only by their passage width (data.doc_widths), so jit's cache holds one program per width;
each trace logs its width, so that a compile in the middle of training is visible and counted.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from pairdistill_jax import sharding, students
from pairdistill_jax.train.state import TrainState, learning_rate

Batch = Mapping[str, jax.Array]


def student_vectors(model: nn.Module, config: ml_collections.ConfigDict, params, batch: Batch,
                    rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """The student's query and document vectors of a batch (documents flattened to [B*nway, ...]).

  With dropout (rng not None) the query and the document calls draw from two independent keys: one key for
  both would give a shared encoder the same dropout masks on a query and the same positions of the documents.
  """
  deterministic = rng is None
  q_rngs, d_rngs = ({}, {}) if deterministic else ({"dropout": k} for k in jax.random.split(rng))
  apply = functools.partial(model.apply, {"params": params}, deterministic=deterministic)
  batch_size, nway, doc_len = batch["d_ids"].shape
  with nn.logical_axis_rules(sharding.rules(config)):  # the model's activation constraints
    q = apply(batch["q_ids"], batch["q_mask"], method="encode_query", rngs=q_rngs)
    d = apply(batch["d_ids"].reshape(batch_size * nway, doc_len),
              batch["d_mask"].reshape(batch_size * nway, doc_len), method="encode_doc", rngs=d_rngs)
  return q, d


def compute_loss(model: nn.Module, config: ml_collections.ConfigDict, params, batch: Batch,
                 rng: jax.Array) -> tuple[jax.Array, dict]:
  """The student's total PairDistill loss on one (micro-)batch (its kind's `loss`), and its metrics."""
  q, d = student_vectors(model, config, params, batch, rng)
  return students.get(config.model.kind).loss(q, d, batch, config)


def split_micro_batches(batch: Batch, k: int) -> Batch:
  """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...

  Strided rather than contiguous, so that every device's rows are spread over all micro-batches and each
  micro-batch stays split over all devices.
  """
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, model: nn.Module,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
               param_shardings) -> tuple[TrainState, dict]:
  """One optimizer step over the global batch, accumulating over config.train.grad_accum micro-batches.

  As the original, the accumulated gradient is the mean of the micro-batch gradients (each micro-batch
  loss divided by the number of micro-batches). A non-finite loss or gradient leaves the state unchanged
  and reports `finite = 0`.
  """
  k = config.train.grad_accum
  doc_width = batch["d_ids"].shape[-1]
  logging.info("Tracing the train step for documents of width %d (it compiles once per width)", doc_width)
  rng = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(functools.partial(compute_loss, model, config), has_aux=True)

  if k == 1:
    (_, metrics), grads = grad_fn(state.params, batch, rng)
  else:
    def accumulate(carry, xs):
      micro, index = xs
      (_, micro_metrics), micro_grads = grad_fn(state.params, micro, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (micro_grads, micro_metrics)), None

    micro_batches = split_micro_batches(batch, k)
    (_, metrics_shape), grads_shape = jax.eval_shape(
        grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches), rng)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grads_shape, metrics_shape))
    (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro_batches, jnp.arange(k)))
    grads, metrics = jax.tree.map(lambda x: x / k, (grads, metrics))
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
  """`train_step` compiled for `mesh`: donated, sharded state in and out; batch split along 'batch'."""
  batch_sh = sharding.batch_sharding(mesh, sharding.rules(config))
  step = functools.partial(train_step, model=model, tx=tx, config=config,
                           param_shardings=state_shardings.params)
  return jax.jit(step, in_shardings=(state_shardings, batch_sh, sharding.replicated(mesh)),
                 out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
