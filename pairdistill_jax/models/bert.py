"""BERT encoder in Flax linen: HF `BertModel` numerics with HF parameter names.

The parameter tree mirrors the PyTorch module names (`embeddings/word_embeddings`,
`encoder/layer_{i}/attention/self/query`, ...) so the HF<->Flax weight table in
`pairdistill_jax.convert.bert_table` is regular. Every parameter carries logical axis names
('vocab', 'embed', 'heads', 'mlp' or None) for `pairdistill_jax.sharding`.
"""

import dataclasses
import functools
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pairdistill_jax.models.attention import attend, attention_mask_bias, choose_kernel
from pairdistill_jax.models.initializers import Axes, param_init

Array = jax.Array

_INIT_STD = 0.02  # HF initializer_range
_SUPPORTED_ACT = "gelu"  # HF "gelu" is the exact erf GELU
_SUPPORTED_POSITIONS = "absolute"
COMPUTE_DTYPES = ("float32", "bfloat16")  # model.dtype and the teachers' dtype (parameters stay float32)
TOKEN_AXES = ("batch", None)  # hidden states as token rows [B*L, H]: split along the batch, whole along H
# model.remat: the nn.remat policy per name; 'none' does not rematerialise at all.
REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing inside a layer: recompute its whole forward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def read_hf_config(path: str | os.PathLike, model: str) -> dict:
  """An HF config.json as a dict; a clear error naming the file when it is not JSON."""
  with open(path, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e}); expected an HF {model} config.json.") from e


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The BERT hyperparameters that change the computation (HF `BertConfig` field names)."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0
  add_pooling_layer: bool = True

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
          f"{self.num_attention_heads}; choose a head count that divides the hidden size.")

  @classmethod
  def from_hf_dict(cls, d: Mapping) -> "BertConfig":
    """Builds a config from an HF config.json dict; keys that are not fields are ignored."""
    act = d.get("hidden_act", _SUPPORTED_ACT)
    if act != _SUPPORTED_ACT:
      raise ValueError(
          f"hidden_act {act!r} is not supported: BertEncoder implements only the exact erf "
          f"GELU (HF 'gelu'); use a checkpoint whose config.json has hidden_act 'gelu'.")
    positions = d.get("position_embedding_type", _SUPPORTED_POSITIONS)
    if positions != _SUPPORTED_POSITIONS:
      raise ValueError(
          f"position_embedding_type {positions!r} is not supported: BertEncoder implements only "
          f"learned absolute positions; use a checkpoint with position_embedding_type 'absolute'.")
    names = {f.name for f in dataclasses.fields(cls)} - {"add_pooling_layer"}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "BertConfig":
    return cls.from_hf_dict(read_hf_config(path, "BERT"))

  def to_hf_dict(self) -> dict:
    """An HF config.json dict (`transformers.BertConfig(**d)` loads it); no add_pooling_layer."""
    d = dataclasses.asdict(self)
    del d["add_pooling_layer"]
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_act": _SUPPORTED_ACT,
        "position_embedding_type": _SUPPORTED_POSITIONS,
        "initializer_range": _INIT_STD,
        **d,
    }


def _gelu(x: Array) -> Array:
  """The exact GELU as HF and PyTorch compute it, x/2 (1 + erf(x/sqrt 2)), in float32 whatever x's dtype (in
  bfloat16, 1 + erf would cancel for negative x); XLA:CPU evaluates erf faster than the erfc of
  `jax.nn.gelu(approximate=False)`."""
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1 + jax.lax.erf(x32 * 0.5**0.5))).astype(x.dtype)


def _dense(features: int, kernel_axes: Axes, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=param_init(nn.initializers.normal(_INIT_STD), kernel_axes),
      bias_init=param_init(nn.initializers.zeros_init(), kernel_axes[-1:]),
      name=name)


def _layer_norm(config: BertConfig, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=param_init(nn.initializers.ones_init(), ("embed",)),
      bias_init=param_init(nn.initializers.zeros_init(), ("embed",)),
      name="LayerNorm")


def _embed(num: int, features: int, axes: Axes, name: str) -> nn.Embed:
  return nn.Embed(
      num,
      features,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      embedding_init=param_init(nn.initializers.normal(_INIT_STD), axes),
      name=name)


def _lookup(num: int, features: int, axes: Axes, name: str, ids: Array) -> Array:
  """Rows `ids` of the embedding table `name`.

  Where logical-axis rules are in effect, the table is first constrained whole along its features (FSDP's
  weight all-gather): rows gathered from a table split along its features would make XLA all-gather the
  ids and move the looked-up activations between devices instead.
  """
  table = _embed(num, features, axes, name).embedding
  return jnp.take(nn.with_logical_constraint(table, (axes[0], None)), ids, axis=0)


class BertEmbeddings(nn.Module):
  """word + absolute position + token-type embeddings, LayerNorm, dropout."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids_BxL: Array, token_type_ids_BxL: Array, deterministic: bool) -> Array:
    cfg = self.config
    length = input_ids_BxL.shape[1]
    if length > cfg.max_position_embeddings:
      raise ValueError(
          f"sequence length {length} exceeds max_position_embeddings "
          f"{cfg.max_position_embeddings}; truncate the inputs.")
    words_BxLxH = _lookup(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), "word_embeddings",
                          input_ids_BxL)
    positions_LxH = _lookup(cfg.max_position_embeddings, cfg.hidden_size, (None, "embed"),
                            "position_embeddings", jnp.arange(length))
    types_BxLxH = _lookup(cfg.type_vocab_size, cfg.hidden_size, (None, "embed"), "token_type_embeddings",
                          token_type_ids_BxL)
    x_BxLxH = _layer_norm(cfg, self.dtype)(words_BxLxH + positions_LxH[None] + types_BxLxH)
    return nn.Dropout(cfg.hidden_dropout_prob)(x_BxLxH, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product attention, float32 softmax.

  `attention` picks the kernel (models/attention.py): 'einsum' (explicit einsums, attention-probability
  dropout), 'chunked' (those einsums over chunks of sequences, for CPUs), 'dot_product_attention'
  (`jax.nn.dot_product_attention`, implementation chosen by JAX), 'cudnn' (its cuDNN flash attention), 'pallas'
  (the TPU Pallas flash attention kernel) or 'auto' (per platform). All but 'einsum' have no
  attention-probability dropout: training with them needs attention_probs_dropout_prob 0. All of them attend
  to the keys the mask keeps from every query row.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_TxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    batch, length = mask_bias_Bx1x1xL.shape[0], mask_bias_Bx1x1xL.shape[-1]
    dropout = not deterministic and cfg.attention_probs_dropout_prob > 0
    kernel = choose_kernel(self.attention, self.dtype, head_dim, length, dropout)

    def project(name: str) -> Array:
      y_TxH = _dense(cfg.hidden_size, ("embed", "heads"), self.dtype, name)(x_TxH)
      return y_TxH.reshape(batch, length, heads, head_dim)

    q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = project("query"), project("key"), project("value")
    drop = functools.partial(nn.Dropout(cfg.attention_probs_dropout_prob), deterministic=deterministic)
    out_BxLxNxD = attend(kernel, q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_bias_Bx1x1xL, drop)
    return out_BxLxNxD.reshape(x_TxH.shape)


class BertResidualOutput(nn.Module):
  """dense -> dropout -> + residual -> LayerNorm (HF BertSelfOutput and BertOutput)."""

  config: BertConfig
  kernel_axes: Axes
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_TxF: Array, residual_TxH: Array, deterministic: bool) -> Array:
    cfg = self.config
    y_TxH = _dense(cfg.hidden_size, self.kernel_axes, self.dtype, "dense")(x_TxF)
    y_TxH = nn.Dropout(cfg.hidden_dropout_prob)(y_TxH, deterministic=deterministic)
    return _layer_norm(cfg, self.dtype)(y_TxH + residual_TxH)


class BertAttention(nn.Module):
  """Self-attention followed by its residual output block."""

  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_TxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    attended_TxH = BertSelfAttention(self.config, self.dtype, self.attention, name="self")(
        x_TxH, mask_bias_Bx1x1xL, deterministic)
    return BertResidualOutput(self.config, ("heads", "embed"), self.dtype, name="output")(
        attended_TxH, x_TxH, deterministic)


class BertIntermediate(nn.Module):
  """dense to intermediate_size followed by the exact erf GELU."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_TxH: Array) -> Array:
    y_TxI = _dense(self.config.intermediate_size, ("embed", "mlp"), self.dtype, "dense")(x_TxH)
    return _gelu(y_TxI)


class BertLayer(nn.Module):
  """One post-LN transformer layer."""

  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_TxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    cfg = self.config
    x_TxH = BertAttention(cfg, self.dtype, self.attention, name="attention")(
        x_TxH, mask_bias_Bx1x1xL, deterministic)
    y_TxI = BertIntermediate(cfg, self.dtype, name="intermediate")(x_TxH)
    return BertResidualOutput(cfg, ("mlp", "embed"), self.dtype, name="output")(
        y_TxI, x_TxH, deterministic)


class BertLayerStack(nn.Module):
  """num_hidden_layers BertLayers named layer_{i}, each rematerialised under the `remat` policy.

  The layers run on token rows ([B*L, H], sequences whole): the gradients of the biases and LayerNorms then
  reduce over one dimension, which XLA:CPU sums up to 8x faster than over [B, L], and the weight gradients
  need no transposed copies (the CPU train step 12-20% faster, README Performance). Between layers the rows are
  constrained to the logical axes TOKEN_AXES (split along 'batch' only) where logical-axis rules are in effect
  (`nn.logical_axis_rules`, as in the train step): otherwise XLA may follow the FSDP-sharded weights and move
  activations instead of gathering weights.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {self.remat!r}")
    layer_cls = BertLayer
    if self.remat != "none":
      layer_cls = nn.remat(BertLayer, static_argnums=(3,), policy=REMAT_POLICIES[self.remat])
    x_TxH = nn.with_logical_constraint(x_BxLxH.reshape(-1, x_BxLxH.shape[-1]), TOKEN_AXES)
    for i in range(self.config.num_hidden_layers):
      x_TxH = layer_cls(self.config, self.dtype, self.attention, name=f"layer_{i}")(
          x_TxH, mask_bias_Bx1x1xL, deterministic)
      x_TxH = nn.with_logical_constraint(x_TxH, TOKEN_AXES)
    return x_TxH.reshape(x_BxLxH.shape)


class BertPooler(nn.Module):
  """tanh(dense(hidden state of the first token))."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH: Array) -> Array:
    y_BxH = _dense(self.config.hidden_size, ("embed", "mlp"), self.dtype, "dense")(x_BxLxH[:, 0])
    return jnp.tanh(y_BxH)


class BertEncoder(nn.Module):
  """HF `BertModel` forward pass: (last hidden states, pooled output or None).

  Attributes:
    config: the BERT hyperparameters.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32, softmax and
      LayerNorm statistics are computed in float32.
    remat: what each layer keeps for the backward pass: 'none' (everything), 'full' (nothing: the
      layer is recomputed), 'dots_saveable' / 'dots_with_no_batch_dims_saveable' (matmul outputs /
      those without batch dimensions, i.e. not the attention matrices); True and False mean 'full'
      and 'none'. Parameter names are unchanged.
    attention: one of models.attention.ATTENTION_KERNELS, 'auto' choosing per platform.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  @nn.compact
  def __call__(
      self,
      input_ids_BxL: Array,
      attention_mask_BxL: Array,
      token_type_ids_BxL: Array | None = None,
      *,
      deterministic: bool = True,
  ) -> tuple[Array, Array | None]:
    if token_type_ids_BxL is None:
      token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
    x_BxLxH = BertEmbeddings(self.config, self.dtype, name="embeddings")(
        input_ids_BxL, token_type_ids_BxL, deterministic)
    hidden_BxLxH = BertLayerStack(self.config, self.dtype, self.remat, self.attention, name="encoder")(
        x_BxLxH, attention_mask_bias(attention_mask_BxL), deterministic)
    if not self.config.add_pooling_layer:
      return hidden_BxLxH, None
    return hidden_BxLxH, BertPooler(self.config, self.dtype, name="pooler")(hidden_BxLxH)
