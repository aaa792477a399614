"""Cached-gradient in-batch negatives (GradCache, Gao et al. 2021): the exact gradient of the global-batch loss
with encoder activations held for one chunk of queries at a time, not for the whole batch.

Three phases per step:
  1. encode the global batch chunk by chunk without gradients, keeping only the student's output vectors
     (ColBERT: token vectors; DPR: one vector per text);
  2. the plain step's loss over the whole batch (pointwise KL, pairwise KL, in-batch negatives) from those
     vectors, and its gradient with respect to them;
  3. re-encode chunk by chunk and pull each chunk's cached vector gradient back into the parameters (one vjp
     per chunk, summed under `lax.scan`: each chunk's activations live only inside its scan iteration).
Chunk i draws its dropout from `chunk_rng(rng, i)` in phases 1 and 3 alike, so both see the same masks.
Unlike gradient accumulation (train.grad_accum), in-batch negatives and DPR's global KL span the whole batch.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from pairdistill_jax import students
from pairdistill_jax.train import forward

ENCODER_KEYS = ("q_ids", "q_mask", "d_ids", "d_mask")  # what the encoders read of a batch


def chunk_rng(rng: jax.Array, index: jax.Array) -> jax.Array:
  """The dropout key of chunk `index` (the same in the encoding and the backward phase)."""
  return jax.random.fold_in(rng, index)


def split_chunks(tree: Any, chunk: int) -> Any:
  """[B, ...] -> [B/chunk, chunk, ...], chunk i = rows i, i + B/chunk, ... (strided as forward.split_micro_batches,
  so that every chunk stays split over the batch shards when chunk is a multiple of their number)."""
  return forward.split_micro_batches(tree, jax.tree.leaves(tree)[0].shape[0] // chunk)


def merge_chunks(tree: Any) -> Any:
  """The inverse of `split_chunks`: [B/chunk, chunk, ...] -> [B, ...] in the batch's row order."""
  return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), tree)


def _encode_chunk(model: nn.Module, config: ml_collections.ConfigDict, rng: jax.Array, params,
                  chunk_batch: forward.Batch, index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(query vectors [K, ...], document vectors [K, nway, ...]) of one chunk of K queries."""
  q_Kx, d_KNx = forward.student_vectors(model, config, params, chunk_batch, chunk_rng(rng, index))
  return q_Kx, d_KNx.reshape(*chunk_batch["d_ids"].shape[:2], *d_KNx.shape[1:])


def gradients(params, batch: forward.Batch, rng: jax.Array, *, model: nn.Module, config: ml_collections.ConfigDict,
              chunk: int) -> tuple[tuple[jax.Array, dict], Any]:
  """((loss, metrics), gradients) of the global batch's loss, encoding `chunk` queries (and their passages) at a
  time: a `step.GradientFn`. Without dropout it is the plain step's (grad_accum 1) up to float round-off; with
  dropout, chunk i's masks come from `chunk_rng(rng, i)` rather than from one whole-batch draw."""
  batch_size, nway = batch["d_ids"].shape[:2]
  if chunk < 1 or batch_size % chunk:
    raise ValueError(f"grad-cache chunk {chunk} must be >= 1 and divide the batch size {batch_size}")
  chunks = split_chunks({key: batch[key] for key in ENCODER_KEYS}, chunk)
  indices = jnp.arange(batch_size // chunk)
  encode = functools.partial(_encode_chunk, model, config, rng)

  q_CxKx, d_CxKxNx = jax.lax.map(lambda xs: encode(params, *xs), (chunks, indices))  # phase 1

  def loss_of_vectors(q_Bx, d_BxNx):
    return students.get(config.model.kind).loss(q_Bx, d_BxNx.reshape(batch_size * nway, *d_BxNx.shape[2:]),
                                                batch, config)

  (loss, metrics), cotangents = jax.value_and_grad(loss_of_vectors, argnums=(0, 1), has_aux=True)(
      *merge_chunks((q_CxKx, d_CxKxNx)))  # phase 2

  def backward(grads, xs):  # phase 3
    chunk_batch, index, chunk_cotangents = xs
    _, pull_back = jax.vjp(lambda p: encode(p, chunk_batch, index), params)
    (chunk_grads,) = pull_back(chunk_cotangents)
    return jax.tree.map(jnp.add, grads, chunk_grads), None

  grads, _ = jax.lax.scan(backward, jax.tree.map(jnp.zeros_like, params),
                          (chunks, indices, split_chunks(cotangents, chunk)))
  return (loss, metrics), grads
