"""Cached-gradient in-batch negatives (train/grad_cache.py): the plain step's loss and gradient of the whole batch,
encoded chunk by chunk, on multi-device meshes; gradient accumulation, by contrast, changes the in-batch loss."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairdistill_jax import config_lib, sharding, students
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.train import grad_cache
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.forward import student_vectors
from pairdistill_jax.train.step import accumulated_gradients, make_train_step
from test_train_step import BATCH, NWAY, assert_trees_close, random_batch, tiny_config

# ColBERT: 4 batch shards (data x fsdp), chunks of 4 queries; DPR: 2 batch shards (fsdp), chunks of 2.
MESHES = {"colbert": (dict(data=2, fsdp=2, tensor=2), 4), "dpr": (dict(data=1, fsdp=2, tensor=4), 2)}
DROPOUT = 0.3


def in_batch_config(kind, dropout=0.0, grad_accum=1):
  """tiny_config with in-batch negatives over the whole (micro-)batch."""
  config = tiny_config(kind, **MESHES[kind][0])
  config.loss.in_batch = True
  if kind == "colbert":
    config.loss.in_batch_group = -1
  config.model.bert.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
  config.train.grad_accum = grad_accum
  return config


def setup(config):
  """(mesh, sharded initial state and its shardings, sharded batch)."""
  mesh = sharding.make_mesh(config)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create(make_model(config), state_lib.optimizer(config), config, mesh,
                                        jax.random.PRNGKey(0))
    batch = sharding.shard_batch(random_batch(0), sharding.batch_sharding(mesh, sharding.rules(config)))
  return mesh, state, shardings, batch


def make_model(config):
  return students.make_student(config.model, BertConfig(**config.model.bert))


def run_gradients(inputs, runs):
  """{name: ((loss, metrics), gradients)} of each run (config, a step.GradientFn, its keywords), all in one jitted
  program (one compile) on the mesh, parameters and batch of `inputs` (`setup`'s)."""
  mesh, state, _, batch = inputs
  fns = {name: functools.partial(fn, model=make_model(config), config=config, **kwargs)
         for name, (config, fn, kwargs) in runs.items()}
  with jax.set_mesh(mesh):
    run_all = jax.jit(lambda params, batch, rng: {name: fn(params, batch, rng) for name, fn in fns.items()})
    return jax.device_get(run_all(state.params, batch, jax.random.PRNGKey(3)))


def chunked_autodiff(params, batch, rng, *, model, config, chunk):
  """The reference of the dropout case: plain autodiff of the whole batch's loss, each chunk (rows i, i + n, ...)
  encoded by its own call with grad_cache.chunk_rng(rng, i), the vectors put back in the batch's row order."""
  n = BATCH // chunk
  rows = [np.arange(i, BATCH, n) for i in range(n)]
  order = np.argsort(np.concatenate(rows))

  def loss(p):
    encoded = [student_vectors(model, config, p, {k: batch[k][r] for k in grad_cache.ENCODER_KEYS},
                               grad_cache.chunk_rng(rng, i)) for i, r in enumerate(rows)]
    q = jnp.concatenate([q for q, _ in encoded])[order]
    d = jnp.concatenate([d.reshape(chunk, NWAY, *d.shape[1:]) for _, d in encoded])[order]
    return students.get(config.model.kind).loss(q, d.reshape(BATCH * NWAY, *d.shape[2:]), batch, config)

  return jax.value_and_grad(loss, has_aux=True)(params)


def grad_errors(grads, ref_grads):
  """Per leaf, ||g - ref|| / (||ref|| + 1e-2 ||ref tree||) (leaves whose exact gradient is 0, such as attention
  key biases, hold float32 round-off); the whole tree's relative error under the key 'tree'."""
  total = np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(ref_grads)))
  diff = jax.tree.map(lambda g, r: np.linalg.norm(g - r) / (np.linalg.norm(r) + 1e-2 * total), grads, ref_grads)
  tree_diff = np.sqrt(sum(np.sum(np.square(g - r)) for g, r in zip(jax.tree.leaves(grads),
                                                                   jax.tree.leaves(ref_grads))))
  return {jax.tree_util.keystr(path): e for path, e in jax.tree_util.tree_leaves_with_path(diff)} | {
      "tree": tree_diff / total}


def assert_grads_close(grads, ref_grads, rtol=1e-5):
  errors = grad_errors(grads, ref_grads)
  assert max(errors.values()) < rtol, {k: e for k, e in errors.items() if e >= rtol}


@pytest.mark.parametrize("kind", ["colbert", "dpr"])
def test_grad_cache_gives_the_whole_batch_loss_and_gradient(kind):
  """Dropout off: the plain step's loss and gradient (over the whole batch), which gradient accumulation, with
  in-batch negatives within each micro-batch, does not give. Dropout on: plain autodiff through the same
  chunk-wise dropout masks (phase 1 and phase 3 must draw the same masks for the gradients to agree)."""
  chunk = MESHES[kind][1]
  config, dropout_config = in_batch_config(kind), in_batch_config(kind, dropout=DROPOUT)
  results = run_gradients(setup(config), {
      "plain": (config, accumulated_gradients, {}),
      "grad_cache": (config, grad_cache.gradients, dict(chunk=chunk)),
      "grad_accum": (in_batch_config(kind, grad_accum=2), accumulated_gradients, {}),
      "dropout_reference": (dropout_config, chunked_autodiff, dict(chunk=chunk)),
      "dropout_grad_cache": (dropout_config, grad_cache.gradients, dict(chunk=chunk))})
  (plain_loss, _), plain_grads = results["plain"]
  (loss, metrics), grads = results["grad_cache"]
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  assert metrics["loss_ib"] > 0 and metrics["loss"] == loss
  assert_grads_close(grads, plain_grads)

  (accum_loss, _), accum_grads = results["grad_accum"]
  assert abs(accum_loss - plain_loss) > 1e-2
  assert grad_errors(accum_grads, plain_grads)["tree"] > 1e-2

  (ref_loss, _), ref_grads = results["dropout_reference"]
  (loss, _), grads = results["dropout_grad_cache"]
  assert abs(loss - plain_loss) > 1e-3  # dropout is on
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  assert_grads_close(grads, ref_grads)


def all_gather_shapes(compiled) -> set[str]:
  return set(re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", compiled.as_text()))


def test_grad_cache_step_equals_the_plain_step_without_gathering_the_batch():
  """make_train_step with train.grad_cache: the plain step's update and metrics; its program all-gathers nothing the
  plain step's does not (parameters for FSDP, the loss's in-batch vectors), so no batch or activation."""
  results = {}
  for name, grad_cache_on in (("plain", False), ("grad_cache", True)):
    config = in_batch_config("colbert")
    config.train.update(grad_cache=grad_cache_on, grad_cache_chunk=0)  # 0: one query per batch shard (4)
    mesh, state, shardings, batch = setup(config)
    with jax.set_mesh(mesh):
      step = make_train_step(make_model(config), state_lib.optimizer(config), config, mesh, shardings)
      compiled = step.lower(state, batch, jax.random.PRNGKey(1)).compile()
      state, metrics = compiled(state, batch, jax.random.PRNGKey(1))
      results[name] = jax.device_get((metrics, state.params)), all_gather_shapes(compiled)
  (ref_metrics, ref_params), ref_gathers = results["plain"]
  (metrics, params), gathers = results["grad_cache"]
  assert metrics.keys() == ref_metrics.keys()
  for key in ("loss", "loss_kd", "loss_pair", "loss_ib", "grad_norm", "lr", "finite"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
  assert_trees_close(params, ref_params)
  assert gathers <= ref_gathers, gathers - ref_gathers


def test_grad_cache_config_errors():
  """One-line config errors: a chunk that does not split the batch evenly over the batch shards, and
  grad_cache together with grad_accum."""
  config = in_batch_config("colbert")  # 4 batch shards, batch 8
  config.train.grad_cache = True
  for chunk in (2, 3, 16):
    config.train.grad_cache_chunk = chunk
    with pytest.raises(ConfigError, match=f"grad_cache_chunk={chunk} must divide"):
      config_lib.validate(config, 8, need_data=False)
  config.train.update(grad_cache_chunk=4, grad_accum=2)
  with pytest.raises(ConfigError, match="grad_accum=2 both split the batch"):
    config_lib.validate(config, 8, need_data=False)
