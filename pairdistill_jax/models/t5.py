"""T5 teacher scorer in Flax linen (monoT5 / duoT5): HF `T5ForConditionalGeneration` numerics.

`T5Scorer` runs the encoder and ONE decoder step whose input is the decoder start token, and returns
that step's LM-head logits (all of them, or only the rows of the tokens asked for, e.g. "true" and
"false"). The parameter tree mirrors the PyTorch module names (`encoder/block_{i}/layer_0/SelfAttention/q`,
...) so the HF<->Flax weight table in `pairdistill_jax.convert.t5_table` is regular. Every parameter carries
logical axis names ('vocab', 'embed', 'heads', 'mlp' or None) for `pairdistill_jax.sharding`.

Shape letters: B batch, L encoder length, Q attending positions, S attended positions, D d_model,
N heads, K d_kv, I heads * d_kv, F d_ff, V vocabulary, T scored tokens.
"""

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pairdistill_jax.models.attention import attention_mask_bias
from pairdistill_jax.models.bert import read_hf_config
from pairdistill_jax.models.initializers import Axes, param_init

Array = jax.Array

ACTIVATION_AXES = ("batch", None, None)  # hidden states: split along the batch only
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
# feed_forward_proj -> (gated, activation). HF maps 'gated-gelu' to gelu_new, the tanh approximation.
FEED_FORWARD: Mapping[str, tuple[bool, Callable[[Array], Array]]] = {
    "relu": (False, jax.nn.relu),
    "gated-gelu": (True, lambda x: jax.nn.gelu(x, approximate=True)),
}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """The T5 hyperparameters that change the computation (HF `T5Config` field names).

  tie_word_embeddings: the LM head is the shared embedding (v1.0); False: a separate lm_head (v1.1).
  scale_decoder_outputs: multiply the decoder output by d_model**-0.5 before the head (HF's v1.0
    behaviour); None means tie_word_embeddings, as in HF.
  num_decoder_layers: None means num_layers.
  """

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True
  scale_decoder_outputs: bool | None = None
  decoder_start_token_id: int = 0
  pad_token_id: int = 0

  def __post_init__(self):
    if self.feed_forward_proj not in FEED_FORWARD:
      raise ValueError(
          f"feed_forward_proj {self.feed_forward_proj!r} is not supported: T5Scorer implements "
          f"{tuple(FEED_FORWARD)} (T5 v1.0 and v1.1); use a checkpoint with one of those.")
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.scale_decoder_outputs is None:
      object.__setattr__(self, "scale_decoder_outputs", self.tie_word_embeddings)

  @property
  def inner_dim(self) -> int:
    """Width of the attention projections: num_heads * d_kv."""
    return self.num_heads * self.d_kv

  @property
  def is_gated(self) -> bool:
    return FEED_FORWARD[self.feed_forward_proj][0]

  @classmethod
  def from_hf_dict(cls, d: Mapping) -> "T5Config":
    """Builds a config from an HF config.json dict; keys that are not fields are ignored.

    As in HF, scale_decoder_outputs defaults to whether tie_word_embeddings is not false, and a missing
    decoder_start_token_id is the pad token. transformers 5 writes tie_word_embeddings true even for
    untied models; `convert.t5_table.import_t5` decides the tie from the weights.
    """
    model_type = d.get("model_type", "t5")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"model_type {model_type!r} is not supported: T5Scorer implements {SUPPORTED_MODEL_TYPES} "
          f"(one relative attention bias per stack); use a T5 / mT5 checkpoint.")
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in d.items() if k in names and v is not None}
    fields["tie_word_embeddings"] = d.get("tie_word_embeddings") is not False
    fields.setdefault("decoder_start_token_id", fields.get("pad_token_id", 0))
    return cls(**fields)

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "T5Config":
    d = read_hf_config(path, "T5")
    try:
      return cls.from_hf_dict(d)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from e

  def to_hf_dict(self) -> dict:
    """An HF config.json dict (`transformers.T5Config(**d)` loads it)."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "is_encoder_decoder": True,
        **dataclasses.asdict(self),
    }


def num_params(config: T5Config) -> int:
  """The number of parameters of a T5Scorer (= HF T5ForConditionalGeneration's, tied weights once)."""
  d, inner = config.d_model, config.inner_dim
  attention = 4 * d * inner
  feed_forward = (3 if config.is_gated else 2) * d * config.d_ff
  relative_bias = config.relative_attention_num_buckets * config.num_heads
  encoder = config.num_layers * (attention + feed_forward + 2 * d) + relative_bias + d
  decoder = config.num_decoder_layers * (2 * attention + feed_forward + 3 * d) + relative_bias + d
  embeddings = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
  return embeddings + encoder + decoder


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
  """HF `T5Attention._relative_position_bucket` in numpy (float32 logarithm, as HF computes it).

  relative_position is memory position - query position; returns int32 buckets in [0, num_buckets).
  """
  relative_position = np.asarray(relative_position, np.int64)
  buckets = np.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0) * num_buckets
    relative_position = np.abs(relative_position)
  else:
    relative_position = -np.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = relative_position < max_exact
  # max(., 1) keeps log finite where is_small discards the value anyway.
  ratio = np.maximum(relative_position, 1).astype(np.float32) / np.float32(max_exact)
  scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
            * np.float32(num_buckets - max_exact))
  if_large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
  return (buckets + np.where(is_small, relative_position, if_large)).astype(np.int32)


def _dense(features: int, fan_in: int, kernel_axes: Axes, dtype: Any, name: str) -> nn.Dense:
  """A bias-free Linear, initialised like HF's T5 (normal, std fan_in**-0.5)."""
  return nn.Dense(
      features,
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=param_init(nn.initializers.normal(fan_in**-0.5), kernel_axes),
      name=name)


def _rows(table_VxD: Array, ids: Array) -> Array:
  """Rows `ids` of an embedding table, gathered from a table whole along its features.

  Where logical-axis rules are in effect the table is first constrained to ('vocab', None) (FSDP's
  weight all-gather), so XLA gathers the weight rather than moving ids and activations between devices.
  """
  return jnp.take(nn.with_logical_constraint(table_VxD, ("vocab", None)), ids, axis=0)


class T5LayerNorm(nn.Module):
  """RMS norm without mean subtraction or bias, statistics in float32 (HF T5LayerNorm)."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxQxD: Array) -> Array:
    scale_D = self.param("scale", param_init(nn.initializers.ones_init(), ("embed",)),
                         (self.config.d_model,), jnp.float32)
    x_BxQxD = x_BxQxD.astype(jnp.float32)
    variance_BxQx1 = jnp.mean(jnp.square(x_BxQxD), axis=-1, keepdims=True)
    normed_BxQxD = x_BxQxD * jax.lax.rsqrt(variance_BxQx1 + self.config.layer_norm_epsilon)
    return (scale_D * normed_BxQxD).astype(self.dtype)


class T5Attention(nn.Module):
  """Multi-head attention without 1/sqrt(d_kv) scaling; float32 scores and softmax.

  With has_relative_bias the module owns the relative position bias table and returns the bias it
  computed for (Q, S), which the later blocks of its stack reuse (HF shares block 0's bias).
  """

  config: T5Config
  dtype: Any = jnp.float32
  has_relative_bias: bool = False
  bidirectional: bool = True

  def _position_bias(self, queries: int, keys: int) -> Array:
    cfg = self.config
    table = nn.Embed(
        cfg.relative_attention_num_buckets,
        cfg.num_heads,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        embedding_init=param_init(nn.initializers.normal(cfg.d_model**-0.5), (None, None)),
        name="relative_attention_bias")
    relative_QxS = np.arange(keys)[None, :] - np.arange(queries)[:, None]
    buckets_QxS = relative_position_bucket(relative_QxS, self.bidirectional,
                                           cfg.relative_attention_num_buckets,
                                           cfg.relative_attention_max_distance)
    bias_QxSxN = table(jnp.asarray(buckets_QxS))
    return jnp.transpose(bias_QxSxN, (2, 0, 1))[None]

  @nn.compact
  def __call__(self, x_BxQxD: Array, kv_BxSxD: Array, mask_bias_Bx1x1xS: Array | None,
               position_bias_1xNxQxS: Array | None) -> tuple[Array, Array | None]:
    cfg = self.config
    if self.has_relative_bias:
      position_bias_1xNxQxS = self._position_bias(x_BxQxD.shape[1], kv_BxSxD.shape[1])

    def project(name: str, y_BxPxD: Array, init_fan_in: int) -> Array:
      z_BxPxI = _dense(cfg.inner_dim, init_fan_in, ("embed", "heads"), self.dtype, name)(y_BxPxD)
      return z_BxPxI.reshape(*z_BxPxI.shape[:2], cfg.num_heads, cfg.d_kv)

    q_BxQxNxK = project("q", x_BxQxD, cfg.d_model * cfg.d_kv)
    k_BxSxNxK = project("k", kv_BxSxD, cfg.d_model)
    v_BxSxNxK = project("v", kv_BxSxD, cfg.d_model)
    scores_BxNxQxS = jnp.einsum("bqnk,bsnk->bnqs", q_BxQxNxK, k_BxSxNxK,
                                preferred_element_type=jnp.float32)
    if position_bias_1xNxQxS is not None:
      scores_BxNxQxS = scores_BxNxQxS + position_bias_1xNxQxS
    if mask_bias_Bx1x1xS is not None:
      scores_BxNxQxS = scores_BxNxQxS + mask_bias_Bx1x1xS
    probs_BxNxQxS = jax.nn.softmax(scores_BxNxQxS, axis=-1)
    out_BxQxNxK = jnp.einsum("bnqs,bsnk->bqnk", probs_BxNxQxS.astype(self.dtype), v_BxSxNxK)
    out_BxQxI = out_BxQxNxK.reshape(*x_BxQxD.shape[:2], cfg.inner_dim)
    out_BxQxD = _dense(cfg.d_model, cfg.inner_dim, ("heads", "embed"), self.dtype, "o")(out_BxQxI)
    return out_BxQxD, position_bias_1xNxQxS


class T5LayerSelfAttention(nn.Module):
  """Pre-norm self-attention with residual; returns (hidden, the position bias used)."""

  config: T5Config
  dtype: Any = jnp.float32
  has_relative_bias: bool = False
  bidirectional: bool = True

  @nn.compact
  def __call__(self, x_BxQxD: Array, mask_bias_Bx1x1xQ: Array | None,
               position_bias_1xNxQxQ: Array | None) -> tuple[Array, Array | None]:
    normed_BxQxD = T5LayerNorm(self.config, self.dtype, name="layer_norm")(x_BxQxD)
    out_BxQxD, position_bias_1xNxQxQ = T5Attention(
        self.config, self.dtype, self.has_relative_bias, self.bidirectional, name="SelfAttention")(
            normed_BxQxD, normed_BxQxD, mask_bias_Bx1x1xQ, position_bias_1xNxQxQ)
    return x_BxQxD + out_BxQxD, position_bias_1xNxQxQ


class T5LayerCrossAttention(nn.Module):
  """Pre-norm attention over the encoder output (no position bias) with residual."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxQxD: Array, encoder_BxLxD: Array, mask_bias_Bx1x1xL: Array) -> Array:
    normed_BxQxD = T5LayerNorm(self.config, self.dtype, name="layer_norm")(x_BxQxD)
    out_BxQxD, _ = T5Attention(self.config, self.dtype, name="EncDecAttention")(
        normed_BxQxD, encoder_BxLxD, mask_bias_Bx1x1xL, None)
    return x_BxQxD + out_BxQxD


class T5DenseReluDense(nn.Module):
  """wi -> activation -> wo, or gated: act(wi_0) * wi_1 -> wo (HF T5DenseActDense / GatedActDense)."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxQxD: Array) -> Array:
    cfg = self.config
    gated, activation = FEED_FORWARD[cfg.feed_forward_proj]

    def wi(name: str) -> Array:
      return _dense(cfg.d_ff, cfg.d_model, ("embed", "mlp"), self.dtype, name)(x_BxQxD)

    if gated:
      y_BxQxF = activation(wi("wi_0")) * wi("wi_1")
    else:
      y_BxQxF = activation(wi("wi"))
    return _dense(cfg.d_model, cfg.d_ff, ("mlp", "embed"), self.dtype, "wo")(y_BxQxF)


class T5LayerFF(nn.Module):
  """Pre-norm feed-forward with residual."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxQxD: Array) -> Array:
    normed_BxQxD = T5LayerNorm(self.config, self.dtype, name="layer_norm")(x_BxQxD)
    return x_BxQxD + T5DenseReluDense(self.config, self.dtype, name="DenseReluDense")(normed_BxQxD)


class T5Block(nn.Module):
  """Self-attention (layer_0), cross-attention (decoder only, layer_1), feed-forward (last layer_j)."""

  config: T5Config
  dtype: Any = jnp.float32
  is_decoder: bool = False
  has_relative_bias: bool = False

  @nn.compact
  def __call__(self, x_BxQxD: Array, mask_bias_Bx1x1xQ: Array | None,
               position_bias_1xNxQxQ: Array | None, encoder_BxLxD: Array | None,
               encoder_mask_bias_Bx1x1xL: Array | None) -> tuple[Array, Array | None]:
    x_BxQxD, position_bias_1xNxQxQ = T5LayerSelfAttention(
        self.config, self.dtype, self.has_relative_bias, not self.is_decoder, name="layer_0")(
            x_BxQxD, mask_bias_Bx1x1xQ, position_bias_1xNxQxQ)
    if self.is_decoder:
      x_BxQxD = T5LayerCrossAttention(self.config, self.dtype, name="layer_1")(
          x_BxQxD, encoder_BxLxD, encoder_mask_bias_Bx1x1xL)
    ff_name = "layer_2" if self.is_decoder else "layer_1"
    return T5LayerFF(self.config, self.dtype, name=ff_name)(x_BxQxD), position_bias_1xNxQxQ


class T5Stack(nn.Module):
  """Encoder or decoder: blocks sharing block 0's relative position bias, then the final RMS norm.

  Between blocks the hidden states are constrained to ACTIVATION_AXES (split along 'batch' only) where
  logical-axis rules are in effect, so XLA gathers FSDP-sharded weights instead of moving activations.
  The decoder's self-attention is causal; with the one decoder position used here that needs no mask.
  """

  config: T5Config
  dtype: Any = jnp.float32
  is_decoder: bool = False

  @nn.compact
  def __call__(self, x_BxQxD: Array, mask_bias_Bx1x1xQ: Array | None,
               encoder_BxLxD: Array | None = None,
               encoder_mask_bias_Bx1x1xL: Array | None = None) -> Array:
    cfg = self.config
    if self.is_decoder and x_BxQxD.shape[1] != 1:
      raise ValueError(f"T5Stack decodes one position only (no causal mask); got "
                       f"{x_BxQxD.shape[1]} decoder positions.")
    num_blocks = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
    position_bias_1xNxQxQ = None
    x_BxQxD = nn.with_logical_constraint(x_BxQxD, ACTIVATION_AXES)
    for i in range(num_blocks):
      x_BxQxD, position_bias_1xNxQxQ = T5Block(
          cfg, self.dtype, self.is_decoder, has_relative_bias=i == 0, name=f"block_{i}")(
              x_BxQxD, mask_bias_Bx1x1xQ, position_bias_1xNxQxQ, encoder_BxLxD,
              encoder_mask_bias_Bx1x1xL)
      x_BxQxD = nn.with_logical_constraint(x_BxQxD, ACTIVATION_AXES)
    return T5LayerNorm(cfg, self.dtype, name="final_layer_norm")(x_BxQxD)


class T5LMHead(nn.Module):
  """The untied (v1.1) LM head: a bias-free [d_model, vocab] projection, or only its token_ids columns."""

  config: T5Config
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, hidden_BxD: Array, token_ids: tuple[int, ...] | None) -> Array:
    cfg = self.config
    kernel_DxV = self.param("kernel", param_init(nn.initializers.normal(1.0), ("embed", "vocab")),
                            (cfg.d_model, cfg.vocab_size), jnp.float32)
    kernel_DxT = kernel_DxV if token_ids is None else jnp.take(
        kernel_DxV, jnp.asarray(token_ids, jnp.int32), axis=1)
    return jnp.einsum("bd,dt->bt", hidden_BxD.astype(self.dtype), kernel_DxT.astype(self.dtype),
                      preferred_element_type=jnp.float32)


class T5Scorer(nn.Module):
  """HF `T5ForConditionalGeneration` logits of the first decoder step (decoder input: the start token).

  Attributes:
    config: the T5 hyperparameters.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters are always float32, the residual stream, RMS
      norm statistics, attention softmax and the returned logits are float32.
  """

  config: T5Config
  dtype: Any = jnp.float32

  def _check_token_ids(self, token_ids: tuple[int, ...]) -> None:
    bad = [t for t in token_ids if not 0 <= t < self.config.vocab_size]
    if bad or not token_ids:
      raise ValueError(f"token_ids must be a non-empty tuple of ids in [0, {self.config.vocab_size}); "
                       f"got {token_ids}.")

  def _head(self, table_VxD: Array, hidden_BxD: Array, token_ids: tuple[int, ...] | None) -> Array:
    """float32 logits over the vocabulary (V) or over token_ids (T)."""
    cfg = self.config
    if cfg.scale_decoder_outputs:
      hidden_BxD = hidden_BxD * cfg.d_model**-0.5
    if not cfg.tie_word_embeddings:
      return T5LMHead(cfg, self.dtype, name="lm_head")(hidden_BxD, token_ids)
    rows_TxD = table_VxD if token_ids is None else _rows(table_VxD, jnp.asarray(token_ids, jnp.int32))
    return jnp.einsum("bd,td->bt", hidden_BxD.astype(self.dtype), rows_TxD.astype(self.dtype),
                      preferred_element_type=jnp.float32)

  @nn.compact
  def __call__(self, input_ids_BxL: Array, attention_mask_BxL: Array,
               token_ids: tuple[int, ...] | None = None) -> Array:
    """Logits [B, len(token_ids)] (token_ids given) or [B, vocab_size], float32."""
    cfg = self.config
    if token_ids is not None:
      self._check_token_ids(token_ids)
    table_VxD = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        param_dtype=jnp.float32,
        embedding_init=param_init(nn.initializers.normal(1.0), ("vocab", "embed")),
        name="shared").embedding
    mask_bias_Bx1x1xL = attention_mask_bias(attention_mask_BxL)
    encoder_BxLxD = T5Stack(cfg, self.dtype, is_decoder=False, name="encoder")(
        _rows(table_VxD, input_ids_BxL), mask_bias_Bx1x1xL)
    start_D = _rows(table_VxD, jnp.asarray(cfg.decoder_start_token_id, jnp.int32))
    start_Bx1xD = jnp.broadcast_to(start_D, (input_ids_BxL.shape[0], 1, cfg.d_model))
    decoded_Bx1xD = T5Stack(cfg, self.dtype, is_decoder=True, name="decoder")(
        start_Bx1xD, None, encoder_BxLxD, mask_bias_Bx1x1xL)
    return self._head(table_VxD, decoded_Bx1xD[:, 0], token_ids)
