"""Relevance scores: ColBERT MaxSim and bi-encoder dot products.

One code path per similarity: `maxsim` / `dot` score every query against every document; the per-query
(`B×nway`) and the in-batch (`B×(G·nway)`) matrices are both views of it (`grouped_scores`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e4  # below any cosine-similarity sum of unit vectors; a masked token never wins the max


def maxsim(q_BxLqxD: jax.Array, d_MxLdxD: jax.Array, d_mask_MxLd: jax.Array) -> jax.Array:
  """Late interaction: s[b, m] = Σ_i max_j <q_bi, d_mj> over the document tokens with mask 1."""
  sim_BxMxLqxLd = jnp.einsum("bqd,mkd->bmqk", q_BxLqxD, d_MxLdxD, preferred_element_type=jnp.float32)
  sim_BxMxLqxLd = jnp.where(d_mask_MxLd[None, :, None, :] > 0, sim_BxMxLqxLd, _MASKED)
  return sim_BxMxLqxLd.max(axis=-1).sum(axis=-1)


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
