"""The sharded train step: mesh invariance, gradient accumulation, parameter shardings, non-finite guard."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import colbert as colbert_config
from configs import dpr as dpr_config
from pairdistill_jax import sharding
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.students import make_student
from pairdistill_jax.train import state as state_lib
from pairdistill_jax.train.forward import compute_loss, student_vectors
from pairdistill_jax.train.step import make_train_step

BATCH, NWAY, LQ, LD, PAIRS, VOCAB = 8, 4, 8, 12, 3, 64


def tiny_config(kind="colbert", **mesh):
  config = (colbert_config if kind == "colbert" else dpr_config).get_config("demo")
  config.model.update(query_maxlen=LQ, doc_maxlen=LD)
  config.model.bert.update(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64)
  config.data.update(nway=NWAY, max_pairs=PAIRS)
  config.train.update(batch_size=BATCH, steps=10)
  # A large Adam eps: parameters whose exact gradient is 0 (a shift common to all of a query's passages)
  # get float32 round-off gradients, which Adam with eps 1e-8 would blow up to full-size updates.
  config.optim.update(lr=1e-3, warmup_steps=2, eps=1e-3)
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1), **mesh)
  return config


def random_batch(seed=0, pairs_per_query=None):
  rng = np.random.default_rng(seed)
  q_mask = np.ones((BATCH, LQ), np.int32)
  q_mask[:, 6:] = 0
  d_mask = (np.arange(LD)[None, None] < rng.integers(4, LD + 1, size=(BATCH, NWAY, 1))).astype(np.int32)
  counts = pairs_per_query if pairs_per_query is not None else rng.integers(0, PAIRS + 1, size=BATCH)
  pair_mask = np.arange(PAIRS)[None] < np.asarray(counts).reshape(-1, 1)
  passage_mask = np.ones((BATCH, NWAY), bool)
  passage_mask[3, -1] = False
  return dict(
      q_ids=rng.integers(7, VOCAB, size=(BATCH, LQ)).astype(np.int32), q_mask=q_mask,
      d_ids=rng.integers(7, VOCAB, size=(BATCH, NWAY, LD)).astype(np.int32), d_mask=d_mask,
      d_score_mask=d_mask * (rng.random((BATCH, NWAY, LD)) < 0.8), teacher=rng.normal(size=(BATCH, NWAY)) * 3,
      passage_mask=passage_mask, pair_i=np.zeros((BATCH, PAIRS), np.int32) + [0, 1, 0],
      pair_j=np.zeros((BATCH, PAIRS), np.int32) + [1, 2, 2],
      pair_logp=np.log(rng.uniform(0.05, 1.0, size=(BATCH, PAIRS))).astype(np.float32), pair_mask=pair_mask)


def run_steps(config, batches, devices=None, *, on_step=lambda metrics, state: None):
  """Initialises (seed 0) and runs one step per batch, calling `on_step(metrics, state)` after each; returns
  (losses, host params, state)."""
  mesh = sharding.make_mesh(config, devices)
  model = make_student(config.model, BertConfig(**config.model.bert))
  tx = state_lib.optimizer(config)
  with jax.set_mesh(mesh):
    state, shardings = state_lib.create(model, tx, config, mesh, jax.random.PRNGKey(0))
    step = make_train_step(model, tx, config, mesh, shardings)
    batch_sh = sharding.batch_sharding(mesh, sharding.rules(config))
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding.shard_batch(batch, batch_sh), jax.random.PRNGKey(1))
      losses.append(float(metrics["loss"]))
      on_step(metrics, state)
  return losses, jax.device_get(state.params), state


def assert_trees_close(a, b, rtol=2e-5, atol=2e-6):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind", ["colbert", "dpr"])
def test_same_step_on_every_mesh(kind):
  batches = [random_batch(0), random_batch(1)]
  ref_losses, ref_params, _ = run_steps(tiny_config(kind), batches, devices=jax.devices()[:1])
  # ColBERT on every mesh kind; DPR (the same step code, other losses) on the mesh with all three axes.
  meshes = [dict(data=8), dict(data=2, fsdp=4)] if kind == "colbert" else []
  for mesh in meshes + [dict(data=2, fsdp=2, tensor=2)]:
    losses, params, _ = run_steps(tiny_config(kind, **mesh), batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, err_msg=str(mesh))
    assert_trees_close(params, ref_params)
  assert ref_losses[1] != ref_losses[0]


def test_parameters_and_optimizer_state_are_sharded_by_the_rules():
  _, _, state = run_steps(tiny_config(data=2, fsdp=2, tensor=2), [random_batch(0)])
  bert = state.params["bert"]
  layer = bert["encoder"]["layer_0"]
  # Written out from the default rules: embed->fsdp, heads/mlp/vocab->tensor.
  expected = {
      "word_embeddings": (bert["embeddings"]["word_embeddings"]["embedding"], P("tensor", "fsdp")),
      "position_embeddings": (bert["embeddings"]["position_embeddings"]["embedding"], P(None, "fsdp")),
      "query": (layer["attention"]["self"]["query"]["kernel"], P("fsdp", "tensor")),
      "attention output": (layer["attention"]["output"]["dense"]["kernel"], P("tensor", "fsdp")),
      "intermediate": (layer["intermediate"]["dense"]["kernel"], P("fsdp", "tensor")),
      "output": (layer["output"]["dense"]["kernel"], P("tensor", "fsdp")),
      "layer norm": (layer["output"]["LayerNorm"]["scale"], P("fsdp")),
      "colbert linear": (state.params["linear"]["kernel"], P("fsdp", None)),
  }
  for name, (array, spec) in expected.items():
    assert array.sharding.spec == spec, name
    assert array.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  adam = state.opt_state[1][0]
  assert adam.mu["bert"]["encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"].sharding.spec == \
      P("fsdp", "tensor")
  assert adam.nu["bert"]["embeddings"]["word_embeddings"]["embedding"].sharding.spec == P("tensor", "fsdp")
  # Each device holds a quarter of the query kernel (fsdp x tensor), not all of it.
  kernel = layer["attention"]["self"]["query"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(16, 16)}


def test_gradient_accumulation_equals_one_step_over_the_whole_batch():
  """The original divides each micro-batch loss by the number of micro-batches k, so the step follows
  (1/k) Σ_m L(micro-batch m). With batch-mean losses and the same number of queries and of pairs in every
  micro-batch, that is exactly the loss of the whole batch: one step with k micro-batches must equal one
  step over the whole batch (in-batch groups made the same on both sides)."""
  batch = random_batch(0, pairs_per_query=[2] * BATCH)
  for k in (4,):
    # Micro-batch m holds rows m, m+k, ...; the whole-batch run sees them consecutively.
    order = np.concatenate([np.arange(m, BATCH, k) for m in range(k)])
    whole = tiny_config()
    whole.loss.in_batch_group = BATCH // k
    accumulated = tiny_config()
    accumulated.train.grad_accum = k
    accumulated.loss.in_batch_group = BATCH // k
    ref_losses, ref_params, _ = run_steps(whole, [{n: v[order] for n, v in batch.items()}])
    losses, params, _ = run_steps(accumulated, [batch])
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert_trees_close(params, ref_params)


def test_non_finite_loss_leaves_the_state_unchanged():
  good, bad = random_batch(0), random_batch(1)
  bad["teacher"][2, 1] = np.nan
  finite, params = [], []

  def record(metrics, state):
    finite.append(float(metrics["finite"]))
    params.append(jax.device_get(state.params))

  run_steps(tiny_config(), [good, bad], on_step=record)
  assert finite == [1.0, 0.0]
  for x, y in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
    np.testing.assert_array_equal(x, y)


def test_bf16_compute_keeps_float32_params_and_close_loss():
  batch = random_batch(0)
  ref_losses, _, _ = run_steps(tiny_config(data=8), [batch])
  config = tiny_config(data=8)
  config.model.dtype = "bfloat16"
  losses, params, _ = run_steps(config, [batch])
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  np.testing.assert_allclose(losses, ref_losses, rtol=3e-2)


def test_remat_gives_the_same_step():
  batches = [random_batch(0), random_batch(1)]
  ref_losses, ref_params, _ = run_steps(tiny_config(data=8), batches)
  config = tiny_config(data=8)
  config.model.remat = "full"
  losses, params, _ = run_steps(config, batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
  assert_trees_close(params, ref_params, rtol=1e-5, atol=1e-7)


def test_query_and_document_dropout_masks_are_independent():
  """A shared encoder fed the same tokens as a query and as a document: the two calls must draw their own
  dropout masks (one key for both gave identical masks, so identical outputs)."""
  config = tiny_config(data=8)
  config.model.update(doc_maxlen=LQ)
  config.model.bert.update(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0)
  model = make_student(config.model, BertConfig(**config.model.bert))
  params = model.init(jax.random.PRNGKey(0), *state_lib.init_inputs(config))["params"]
  ids = np.random.default_rng(0).integers(7, VOCAB, size=(1, LQ)).astype(np.int32)
  mask = np.ones((1, LQ), np.int32)
  batch = dict(q_ids=ids, q_mask=mask, d_ids=ids[:, None], d_mask=mask[:, None])
  q, d = student_vectors(model, config, params, batch, None)
  np.testing.assert_allclose(q, d, atol=1e-6)  # same tokens, no dropout: same vectors
  differing = []
  for seed in range(4):
    q, d = student_vectors(model, config, params, batch, jax.random.PRNGKey(seed))
    differing.append(np.mean(np.abs(np.asarray(q) - np.asarray(d)).max(-1) > 1e-4))
  assert min(differing) > 0.9, differing  # (independent 50% masks make every token vector differ)


def test_dropout_step_is_mesh_invariant_and_differs_from_the_deterministic_step():
  batches = [random_batch(0), random_batch(1)]
  no_dropout, _, _ = run_steps(tiny_config(data=8), batches)
  losses = {}
  for mesh in (dict(data=8), dict(data=2, fsdp=4)):
    config = tiny_config(**mesh)
    config.model.bert.update(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    losses[str(mesh)], _, _ = run_steps(config, batches)
  first, second = losses.values()
  assert np.all(np.isfinite(first))
  np.testing.assert_allclose(first, second, rtol=1e-5)
  assert abs(first[0] - no_dropout[0]) > 1e-3


def test_dpr_workers_reach_the_loss():
  """loss.dpr_workers=W (the original's W-GPU gradient): with pair_alpha 0, the same loss and 1/W of the
  exact gradient."""
  config = tiny_config("dpr")
  config.loss.pair_alpha = 0.0
  model = make_student(config.model, BertConfig(**config.model.bert))
  params = model.init(jax.random.PRNGKey(0), *state_lib.init_inputs(config))["params"]
  results = []
  for workers in (0, 4):
    config.loss.dpr_workers = workers
    grad_fn = jax.value_and_grad(functools.partial(compute_loss, model, config), has_aux=True)
    results.append(grad_fn(params, random_batch(0), None))
  ((exact_loss, _), exact_grads), ((loss, _), grads) = results
  np.testing.assert_allclose(loss, exact_loss, rtol=1e-6)
  assert_trees_close(grads, jax.tree.map(lambda g: g / 4, exact_grads), rtol=1e-5, atol=1e-9)
