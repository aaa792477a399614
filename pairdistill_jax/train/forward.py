"""The student's forward pass on a training batch: its query and document vectors, and its PairDistill loss.

Both step builders (train/step.py's accumulated gradients, train/grad_cache.py's cached gradients) build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import ml_collections

from pairdistill_jax import sharding, students

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
