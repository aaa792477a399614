"""Relevance scores: ColBERT MaxSim and bi-encoder dot products (and the L2 normalisation of vectors).

One code path per similarity: `maxsim` / `dot` score every query against every document; the per-query
(`B×nway`) and the in-batch (`B×(G·nway)`) matrices are both views of it (`grouped_scores`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e4  # below any cosine-similarity sum of unit vectors; a masked token never wins the max


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis, in float32 (torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def maxsim(q_BxLqxD: jax.Array, d_MxLdxD: jax.Array, d_mask_MxLd: jax.Array, chunk: int = 0) -> jax.Array:
  """Late interaction: s[b, m] = Σ_i max_j <q_bi, d_mj> over the document tokens with mask 1.

  chunk > 0 scores the documents `chunk` at a time (a loop, each chunk rematerialised in the backward
  pass), so the B×M×Lq×Ld similarity tensor never exists whole, neither forward nor backward; 0 (or a
  chunk of at least M) computes it in one piece.
  """
  if 0 < chunk < d_MxLdxD.shape[0]:
    return _maxsim_chunked(q_BxLqxD, d_MxLdxD, d_mask_MxLd, chunk)
  return _maxsim_dense(q_BxLqxD, d_MxLdxD, d_mask_MxLd)


def _maxsim_dense(q_BxLqxD: jax.Array, d_MxLdxD: jax.Array, d_mask_MxLd: jax.Array) -> jax.Array:
  sim_BxMxLqxLd = jnp.einsum("bqd,mkd->bmqk", q_BxLqxD, d_MxLdxD, preferred_element_type=jnp.float32)
  sim_BxMxLqxLd = jnp.where(d_mask_MxLd[None, :, None, :] > 0, sim_BxMxLqxLd, _MASKED)
  return sim_BxMxLqxLd.max(axis=-1).sum(axis=-1)


def _maxsim_chunked(q_BxLqxD: jax.Array, d_MxLdxD: jax.Array, d_mask_MxLd: jax.Array, chunk: int) -> jax.Array:
  """`_maxsim_dense` over chunks of documents; the last chunk is padded with masked documents."""
  num_docs = d_MxLdxD.shape[0]
  num_chunks = -(-num_docs // chunk)
  pad = num_chunks * chunk - num_docs
  d_CxKxLdxD = jnp.pad(d_MxLdxD, ((0, pad), (0, 0), (0, 0))).reshape(num_chunks, chunk, *d_MxLdxD.shape[1:])
  d_mask_CxKxLd = jnp.pad(d_mask_MxLd, ((0, pad), (0, 0))).reshape(num_chunks, chunk, -1)
  score_chunk = jax.checkpoint(_maxsim_dense)
  scores_CxBxK = jax.lax.map(lambda xs: score_chunk(q_BxLqxD, *xs), (d_CxKxLdxD, d_mask_CxKxLd))
  scores_BxCK = scores_CxBxK.transpose(1, 0, 2).reshape(q_BxLqxD.shape[0], num_chunks * chunk)
  return scores_BxCK[:, :num_docs]


def dot(q_BxD: jax.Array, d_MxD: jax.Array) -> jax.Array:
  """Bi-encoder relevance: s[b, m] = <q_b, d_m>."""
  return jnp.einsum("bd,md->bm", q_BxD, d_MxD, preferred_element_type=jnp.float32)


def grouped_scores(score_fn, q_Bx, d_BxNx, *d_extra_BxNx, group_size: int) -> jax.Array:
  """Scores each query against all passages of its group of `group_size` consecutive queries.

  Returns scores_BxGN with scores_BxGN[b, c*N + n] = score(query b, passage n of the c-th query of b's
  group). group_size=1 gives the per-query B×N scores; group_size=B the whole batch.
  """
  batch, nway = d_BxNx.shape[:2]
  groups = batch // group_size

  def group_view(x):  # [B, N, ...] -> [B/G, G*N, ...]
    return x.reshape(groups, group_size * nway, *x.shape[2:])

  q_GroupsxGx = q_Bx.reshape(groups, group_size, *q_Bx.shape[1:])
  scores = jax.vmap(score_fn)(q_GroupsxGx, group_view(d_BxNx), *map(group_view, d_extra_BxNx))
  return scores.reshape(batch, group_size * nway)


def own_block(scores_BxGN: jax.Array, nway: int, group_size: int) -> jax.Array:
  """The B×N scores of each query against its own passages, cut from the grouped matrix."""
  batch = scores_BxGN.shape[0]
  scores_BxGxN = scores_BxGN.reshape(batch, group_size, nway)
  own_B = jnp.arange(batch) % group_size
  return jnp.take_along_axis(scores_BxGxN, own_B[:, None, None], axis=1)[:, 0]
