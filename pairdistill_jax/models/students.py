"""The two students as Flax linen modules: ColBERT (late interaction) and DPR (bi-encoder).

Both expose `encode_query(ids, mask)` and `encode_doc(ids, mask)`; relevance is computed by
`models.scoring` from their outputs, so training, export and retrieval share one scoring path.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pairdistill_jax.models.bert import BertConfig, BertEncoder


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) along the last axis, in float32 (torch.nn.functional.normalize)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class ColBERT(nn.Module):
  """BERT -> linear H->dim without bias -> L2-normalised token vectors (stanford ColBERTv2)."""

  bert_config: BertConfig
  dim: int = 128
  dtype: Any = jnp.float32
  remat: str | bool = "none"
  attention: str = "einsum"

  def setup(self):
    self.bert = BertEncoder(self.bert_config, dtype=self.dtype, remat=self.remat, attention=self.attention)
    self.linear = nn.Dense(
        self.dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)))

  def _encode(self, ids_BxL, mask_BxL, deterministic):
    hidden_BxLxH, _ = self.bert(ids_BxL, mask_BxL, deterministic=deterministic)
    return l2_normalize(self.linear(hidden_BxLxH))

  def encode_query(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    """All query_maxlen vectors, [MASK] augmentation included (they are scored)."""
    return self._encode(ids_BxL, mask_BxL, deterministic)

  def encode_doc(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    """Token vectors; which of them count in MaxSim is the tokenizer's score_mask."""
    return self._encode(ids_BxL, mask_BxL, deterministic)

  def __call__(self, q_ids, q_mask, d_ids, d_mask, *, deterministic: bool = True):
    """Used by `init` only: touches every parameter."""
    return (self.encode_query(q_ids, q_mask, deterministic=deterministic),
            self.encode_doc(d_ids, d_mask, deterministic=deterministic))


def pool(hidden_BxLxH: jax.Array, mask_BxL: jax.Array, pooling: str) -> jax.Array:
  """[CLS] vector or the attention-masked mean of the token vectors (sentence-transformers), float32."""
  hidden_BxLxH = hidden_BxLxH.astype(jnp.float32)
  if pooling == "cls":
    return hidden_BxLxH[:, 0]
  weights_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
  return (hidden_BxLxH * weights_BxLx1).sum(1) / jnp.maximum(weights_BxLx1.sum(1), 1e-9)


class DPR(nn.Module):
  """Query and passage BERT towers (or one shared tower) pooled to one vector each (L2-normalised when
  `normalize`, as sentence-transformers bi-encoders with a Normalize module: the dot product is the cosine)."""

  bert_config: BertConfig
  pooling: str = "cls"
  shared_towers: bool = False
  normalize: bool = False
  dtype: Any = jnp.float32
  remat: str | bool = "none"
  attention: str = "einsum"

  def setup(self):
    make = lambda: BertEncoder(self.bert_config, dtype=self.dtype, remat=self.remat, attention=self.attention)
    if self.shared_towers:
      self.encoder = make()
    else:
      self.query_encoder = make()
      self.passage_encoder = make()

  def _tower(self, which):
    return self.encoder if self.shared_towers else getattr(self, f"{which}_encoder")

  def _encode(self, which, ids_BxL, mask_BxL, deterministic):
    hidden_BxLxH, _ = self._tower(which)(ids_BxL, mask_BxL, deterministic=deterministic)
    pooled_BxH = pool(hidden_BxLxH, mask_BxL, self.pooling)
    return l2_normalize(pooled_BxH) if self.normalize else pooled_BxH

  def encode_query(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    return self._encode("query", ids_BxL, mask_BxL, deterministic)

  def encode_doc(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    return self._encode("passage", ids_BxL, mask_BxL, deterministic)

  def __call__(self, q_ids, q_mask, d_ids, d_mask, *, deterministic: bool = True):
    """Used by `init` only: touches every parameter."""
    return (self.encode_query(q_ids, q_mask, deterministic=deterministic),
            self.encode_doc(d_ids, d_mask, deterministic=deterministic))


def make_student(model_config, bert_config: BertConfig) -> nn.Module:
  """The student module that `config.model` describes (runs saved before `attention` existed: einsum)."""
  dtype = jnp.dtype(model_config.dtype)
  kernels = dict(remat=model_config.remat, attention=model_config.get("attention", "einsum"))
  if model_config.kind == "colbert":
    return ColBERT(bert_config, dim=model_config.dim, dtype=dtype, **kernels)
  return DPR(bert_config, pooling=model_config.pooling, shared_towers=model_config.shared_towers,
             normalize=model_config.get("normalize", False), dtype=dtype, **kernels)
