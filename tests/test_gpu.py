"""On an NVIDIA GPU (skipped without one): cuDNN attention against the einsums, FAISS on the GPU against FAISS on
the CPU, and the sharded train step on the GPUs against the CPU. Run by benchmarks/device_check.sh (with
JAX_PLATFORMS=cuda,cpu: conftest otherwise keeps JAX on the CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairdistill_jax.models import attention, bert
from pairdistill_jax.retrieval import corpus, faiss_index, search

from test_train_step import random_batch, run_steps, tiny_config


def _gpu_count() -> int:
  try:
    return len(jax.devices("gpu"))
  except RuntimeError:  # no GPU backend (e.g. JAX_PLATFORMS=cpu)
    return 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu_count(), reason="needs an NVIDIA GPU")]
needs_faiss_gpu = pytest.mark.skipif(not faiss_index.use_gpu(), reason="the installed faiss has no GPU support")


def lengths_mask(lengths, length):
  return (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)


def test_auto_picks_cudnn_here():
  assert attention._platform() == "cuda"
  assert attention.select_attention("auto", jnp.bfloat16, 32, 180, False)[0] == "cudnn"
  assert attention.select_attention("auto", jnp.float32, 32, 180, False)[0] == "einsum"


@pytest.mark.parametrize("length", [32, 180])
def test_cudnn_attention_matches_the_einsums(length):
  lengths = [length, 1, 3, 0, length // 2, length - 2]  # 3: a ColBERT query of [MASK] padding; 0: no keys
  q, k, v, cotangent = (jax.random.normal(key, (len(lengths), length, 12, 32))
                        for key in jax.random.split(jax.random.key(0), 4))
  cotangent = cotangent * (np.asarray(lengths) > 0)[:, None, None, None]  # see tests/test_attention.py
  bias = attention.attention_mask_bias(lengths_mask(lengths, length))

  def cudnn(q, k, v):
    q, keys = attention._fused_inputs(q, bias)
    return attention._cudnn_attention(q, k, v, keys)

  def einsum(q, k, v):
    return attention._einsum_attention(q, k, v, bias, lambda probs: probs)

  def value_and_grads(kernel, dtype):
    qkv = [x.astype(dtype) for x in (q, k, v)]
    loss = lambda *qkv: jnp.sum(kernel(*qkv).astype(jnp.float32) * cotangent)
    return jax.jit(lambda *qkv: (kernel(*qkv), jax.grad(loss, argnums=(0, 1, 2))(*qkv)))(*qkv)

  assert "__cudnn$fmha" in jax.jit(cudnn).lower(*(x.astype(jnp.bfloat16) for x in (q, k, v))).as_text()
  with jax.default_matmul_precision("float32"):
    want, want_grads = value_and_grads(einsum, jnp.float32)
  got, grads = value_and_grads(cudnn, jnp.bfloat16)
  assert np.abs(np.asarray(got, np.float32) - np.asarray(want)).max() <= 3e-2
  for grad, want_grad in zip(grads, want_grads):
    scale = max(1.0, float(np.abs(want_grad).max()))
    assert np.abs(np.asarray(grad, np.float32) - np.asarray(want_grad)).max() <= 5e-2 * scale


def test_bf16_encoder_on_cudnn_matches_the_einsums():
  config = bert.BertConfig(vocab_size=100, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                           intermediate_size=1536, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  ids = jax.random.randint(jax.random.key(1), (8, 180), 1, 100)
  mask = lengths_mask([180, 3, 90, 17, 180, 1, 150, 64], 180)
  params = bert.BertEncoder(config).init(jax.random.key(0), ids, mask)["params"]

  @functools.partial(jax.jit, static_argnames="attention")
  def encode(params, attention):
    return bert.BertEncoder(config, dtype=jnp.bfloat16, attention=attention).apply({"params": params}, ids, mask)[0]

  hidden = np.asarray(encode(params, "auto"), np.float32)
  want = np.asarray(encode(params, "einsum"), np.float32)
  assert np.abs(hidden - want).max() <= 0.1 and np.abs(hidden - want).mean() <= 1e-2


def _faiss_on(use_gpu: bool, monkeypatch, build):
  """What `build()` returns with FAISS on the GPUs or on the CPU."""
  with monkeypatch.context() as patch:
    patch.setattr(faiss_index, "use_gpu", lambda: use_gpu)
    return build()


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@needs_faiss_gpu
def test_faiss_gpu_flat_search_equals_the_cpu(monkeypatch):
  rng = np.random.default_rng(0)
  docs = rng.normal(size=(50_000, 128)).astype(np.float32)
  queries = rng.normal(size=(200, 128)).astype(np.float32)
  run = lambda: search.search(queries, corpus.DenseStore([docs[:30_000], docs[30_000:]]), 10,
                              search.SearchOptions(index="flat"))
  gpu_scores, gpu_ids = _faiss_on(True, monkeypatch, run)
  cpu_scores, cpu_ids = _faiss_on(False, monkeypatch, run)
  np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-5, atol=1e-4)
  # The same documents at every rank whose float64 score is 1e-3 away from its neighbours' (float32 round-off
  # is about 3e-5 here; closer pairs may swap).
  top = -np.sort(-(queries.astype(np.float64) @ docs.T.astype(np.float64)), axis=1)[:, :11]
  gaps = -np.diff(top, axis=1)
  separated = np.minimum(gaps[:, :10], np.pad(gaps[:, :9], ((0, 0), (1, 0)), constant_values=np.inf)) > 1e-3
  assert separated.mean() > 0.95
  np.testing.assert_array_equal(gpu_ids[separated], cpu_ids[separated])


@needs_faiss_gpu
def test_faiss_gpu_ivfpq_recalls_as_well_as_the_cpu(monkeypatch):
  rng = np.random.default_rng(1)
  docs = _unit(rng.normal(size=(50_000, 64))).astype(np.float32)
  targets = rng.choice(len(docs), 200, replace=False)
  queries = _unit(docs[targets] + 0.05 * rng.normal(size=(200, 64))).astype(np.float32)
  exact_ids = np.argsort(-(queries @ docs.T), axis=1)[:, :10]
  run = lambda: search.search(queries, corpus.DenseStore([docs]), 10, search.SearchOptions(index="ivfpq", nprobe=16))
  recall = {}
  for use_gpu in (True, False):
    _, ids = _faiss_on(use_gpu, monkeypatch, run)
    assert (ids[:, 0] == targets).mean() >= 0.9, use_gpu
    recall[use_gpu] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
  assert recall[True] >= recall[False] - 0.05, recall


def test_sharded_train_step_on_the_gpus_matches_the_cpu():
  batches = [random_batch(0), random_batch(1)]
  config = tiny_config()
  config.model.update(dtype="float32", attention="einsum")
  with jax.default_matmul_precision("float32"):
    want, want_params, _ = run_steps(config, batches, devices=jax.devices("cpu")[:1])
    losses, params, _ = run_steps(config, batches, devices=jax.devices("gpu"))
  np.testing.assert_allclose(losses, want, rtol=1e-4)
  for got, ref in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-4)
  config.model.update(dtype="bfloat16", attention="auto")  # cuDNN attention (head dim 8, even lengths)
  bf16_losses, _, _ = run_steps(config, batches, devices=jax.devices("gpu"))
  np.testing.assert_allclose(bf16_losses, want, rtol=5e-2)
