"""BERT encoder in Flax linen: HF `BertModel` numerics with HF parameter names.

The parameter tree mirrors the PyTorch module names (`embeddings/word_embeddings`,
`encoder/layer_{i}/attention/self/query`, ...) so the HF<->Flax weight table in
`pairdistill_jax.convert.bert_table` is regular. Every parameter carries logical axis names
('vocab', 'embed', 'heads', 'mlp' or None) for `pairdistill_jax.sharding`.
"""

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.sharding import PartitionSpec as P

Array = jax.Array
Axes = tuple[str | None, ...]

_INIT_STD = 0.02  # HF initializer_range
_SUPPORTED_ACT = "gelu"  # HF "gelu" is the exact erf GELU
_SUPPORTED_POSITIONS = "absolute"
# model.attention: 'auto' picks one of the others per platform (select_attention).
ATTENTION_KERNELS = ("auto", "einsum", "dot_product_attention", "cudnn", "pallas")
FUSED_ATTENTION = ("dot_product_attention", "cudnn", "pallas")  # no attention-probability dropout
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention on Ampere (256 from Hopper on)
_PALLAS_BLOCK = 128  # the TPU flash_attention tile: sequences are padded to a multiple of it
COMPUTE_DTYPES = ("float32", "bfloat16")  # model.dtype and the teachers' dtype (parameters stay float32)
ACTIVATION_AXES = ("batch", None, None)  # hidden states: split along the batch, whole along length and H
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


def _param_init(init: nn.initializers.Initializer, axes: Axes) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(init, axes)


def _dense(features: int, kernel_axes: Axes, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=_param_init(nn.initializers.normal(_INIT_STD), kernel_axes),
      bias_init=_param_init(nn.initializers.zeros_init(), kernel_axes[-1:]),
      name=name)


def _layer_norm(config: BertConfig, dtype: Any) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_fast_variance=False,
      scale_init=_param_init(nn.initializers.ones_init(), ("embed",)),
      bias_init=_param_init(nn.initializers.zeros_init(), ("embed",)),
      name="LayerNorm")


def _embed(num: int, features: int, axes: Axes, name: str) -> nn.Embed:
  return nn.Embed(
      num,
      features,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      embedding_init=_param_init(nn.initializers.normal(_INIT_STD), axes),
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


def _platform() -> str:
  """Where jitted computations run by default: 'cuda' (an NVIDIA GPU with cuDNN flash attention, Ampere or
  later), 'gpu' (any other GPU), 'tpu' or 'cpu'."""
  backend = jax.default_backend()
  if backend != "gpu":
    return backend
  device = jax.devices()[0]
  capability = tuple(int(x) for x in getattr(device, "compute_capability", "0.0").split("."))
  return "cuda" if "cuda" in device.client.platform_version.lower() and capability >= (8, 0) else "gpu"


def select_attention(attention: str, dtype: Any, head_dim: int, length: int, dropout: bool,
                     platform: str | None = None) -> tuple[str, str]:
  """The kernel model.attention=`attention` runs as, and why.

  'auto' takes cuDNN flash attention on NVIDIA GPUs (bfloat16/float16 and shapes it supports), the Pallas
  flash attention kernel on TPUs and the einsums (the XLA path) everywhere else; training with
  attention-probability dropout (`dropout`) always takes the einsums, the only kernel that has it.
  platform: as `_platform()` names it (by default the platform jitted computations run on).
  """
  if attention not in ATTENTION_KERNELS:
    raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
  if attention != "auto":
    if dropout and attention in FUSED_ATTENTION:
      raise ValueError(
          f"attention={attention!r} has no attention-probability dropout but training applies it; set "
          "--config.model.bert.attention_probs_dropout_prob=0 or use attention='auto' or 'einsum'.")
    return attention, "set in model.attention"
  if dropout:
    return "einsum", "training with attention-probability dropout, which only the einsum path has"
  platform = platform or _platform()
  if platform == "cuda":
    if jnp.dtype(dtype) not in _CUDNN_DTYPES:
      return "einsum", f"cuDNN attention needs bfloat16 or float16, the compute dtype is {jnp.dtype(dtype)}"
    if head_dim > _CUDNN_MAX_HEAD_DIM or head_dim % 8 or length % 2:
      return "einsum", f"cuDNN flash attention does not take head dim {head_dim} with length {length}"
    return "cudnn", f"NVIDIA GPU, {jnp.dtype(dtype)}"
  if platform == "tpu":
    if head_dim > _PALLAS_BLOCK and head_dim % _PALLAS_BLOCK:
      return "einsum", f"the TPU flash attention kernel does not take head dim {head_dim}"
    return "pallas", "TPU"
  return "einsum", f"{platform}: the einsums are the XLA formulation and the fastest measured on CPU"


@functools.cache
def _log_selection(kernel: str, reason: str) -> None:
  """Logs each of auto's choices once per process."""
  logging.info("model.attention='auto' runs %r: %s", kernel, reason)


def _einsum_attention(q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, mask_bias_Bx1x1xL: Array,
                      dropout: Callable[[Array], Array]) -> Array:
  """Softmax attention as two einsums, heads-major ([B, N, L, D]: the fastest layout measured on CPU)."""
  q_BxNxLxD, k_BxNxLxD, v_BxNxLxD = (x.transpose(0, 2, 1, 3) for x in (q_BxLxNxD, k_BxLxNxD, v_BxLxNxD))
  logits_BxNxLxL = jnp.einsum("bnqd,bnkd->bnqk", q_BxNxLxD, k_BxNxLxD, preferred_element_type=jnp.float32)
  logits_BxNxLxL = logits_BxNxLxL * q_BxNxLxD.shape[-1]**-0.5 + mask_bias_Bx1x1xL
  probs_BxNxLxL = dropout(jax.nn.softmax(logits_BxNxLxL, axis=-1))
  out_BxNxLxD = jnp.einsum("bnqk,bnkd->bnqd", probs_BxNxLxL.astype(v_BxNxLxD.dtype), v_BxNxLxD)
  return out_BxNxLxD.transpose(0, 2, 1, 3)


def _fused_inputs(q_BxLxNxD: Array, mask_bias_Bx1x1xL: Array) -> tuple[Array, Array]:
  """The queries and key mask the fused kernels take: every query row (padding rows too) attends to the keys
  the mask keeps. A sequence without any gets the einsum path's answer, the mean of its values: zero queries
  attending to all of its keys."""
  keys_BxL = mask_bias_Bx1x1xL[:, 0, 0] == 0
  has_keys_Bx1 = keys_BxL.any(axis=1, keepdims=True)
  return q_BxLxNxD * has_keys_Bx1[:, :, None, None].astype(q_BxLxNxD.dtype), keys_BxL | ~has_keys_Bx1


def _xla_attention(q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, keys_BxL: Array) -> Array:
  """`jax.nn.dot_product_attention`, implementation chosen by JAX."""
  return jax.nn.dot_product_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask=keys_BxL[:, None, None, :])


def _cudnn_attention(q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, keys_BxL: Array) -> Array:
  """cuDNN flash attention; the key mask becomes its [B, 1, L, L] bias (it takes no broadcast one)."""
  batch, length = keys_BxL.shape
  mask_Bx1xLxL = jnp.broadcast_to(keys_BxL[:, None, None, :], (batch, 1, length, length))
  return jax.nn.dot_product_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask=mask_Bx1xLxL,
                                      implementation="cudnn")


def _pallas_flash(q_BxNxPxD: Array, k_BxNxPxD: Array, v_BxNxPxD: Array, keys_BxP: Array) -> Array:
  """The TPU Pallas flash attention kernel (Mosaic: TPUs only, or Pallas TPU interpret mode): query segment 1
  everywhere, key segment 1 where attended, so every query row (ColBERT's [MASK] padding rows too) attends to
  its sequence's keys."""
  segments = tpu_flash.SegmentIds(q=jnp.ones(keys_BxP.shape, jnp.int32), kv=keys_BxP.astype(jnp.int32))
  return tpu_flash.flash_attention(q_BxNxPxD, k_BxNxPxD, v_BxNxPxD, segment_ids=segments,
                                   sm_scale=q_BxNxPxD.shape[-1]**-0.5)


def _shard_spec(logical: Axes, shape: tuple[int, ...]) -> P:
  """The mesh axes of `logical` under the logical-axis rules and mesh in effect; None where they do not
  divide the dimension."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return P(*(None for _ in shape))
  spec = []
  for axes, size in zip(nn.logical_to_mesh_axes(logical), shape):
    names = axes if isinstance(axes, tuple) else (axes,)
    shards = math.prod(mesh.shape[n] for n in names if n is not None)
    spec.append(axes if axes is not None and size % shards == 0 else None)
  return P(*spec)


def _pallas_attention(q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, keys_BxL: Array) -> Array:
  """_pallas_flash on heads-major inputs padded to a multiple of its tile (padded keys are not attended).

  Under a mesh it runs per shard of the batch and heads (`jax.shard_map`): XLA cannot split a Pallas kernel
  itself and would gather every input whole onto each device.
  """
  length = keys_BxL.shape[1]
  pad = -length % _PALLAS_BLOCK
  q_BxNxPxD, k_BxNxPxD, v_BxNxPxD = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
                                     for x in (q_BxLxNxD, k_BxLxNxD, v_BxLxNxD))
  keys_BxP = jnp.pad(keys_BxL, ((0, 0), (0, pad)))
  spec = _shard_spec(("batch", "heads", None, None), q_BxNxPxD.shape)
  flash = _pallas_flash
  if any(axes is not None for axes in spec):
    flash = jax.shard_map(flash, in_specs=(spec, spec, spec, P(spec[0], None)), out_specs=spec,
                          check_vma=False)
  out_BxNxPxD = flash(q_BxNxPxD, k_BxNxPxD, v_BxNxPxD, keys_BxP)
  return out_BxNxPxD[:, :, :length].transpose(0, 2, 1, 3)


_FUSED = {"dot_product_attention": _xla_attention, "cudnn": _cudnn_attention, "pallas": _pallas_attention}


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product attention, float32 softmax.

  `attention` picks the kernel (`select_attention`): 'einsum' (explicit einsums, attention-probability
  dropout), 'dot_product_attention' (`jax.nn.dot_product_attention`, implementation chosen by JAX), 'cudnn'
  (its cuDNN flash attention), 'pallas' (the TPU Pallas flash attention kernel) or 'auto' (per platform).
  The fused kernels have no attention-probability dropout: training with them needs
  attention_probs_dropout_prob 0. All of them attend to the keys the mask keeps from every query row.
  """

  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    cfg = self.config
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    dropout = not deterministic and cfg.attention_probs_dropout_prob > 0
    kernel, reason = select_attention(self.attention, self.dtype, head_dim, x_BxLxH.shape[1], dropout)
    if self.attention == "auto":
      _log_selection(kernel, reason)

    def project(name: str) -> Array:
      y_BxLxH = _dense(cfg.hidden_size, ("embed", "heads"), self.dtype, name)(x_BxLxH)
      return y_BxLxH.reshape(*y_BxLxH.shape[:2], heads, head_dim)

    q_BxLxNxD, k_BxLxNxD, v_BxLxNxD = project("query"), project("key"), project("value")
    if kernel == "einsum":
      drop = functools.partial(nn.Dropout(cfg.attention_probs_dropout_prob), deterministic=deterministic)
      out_BxLxNxD = _einsum_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_bias_Bx1x1xL, drop)
    else:
      q_BxLxNxD, keys_BxL = _fused_inputs(q_BxLxNxD, mask_bias_Bx1x1xL)
      out_BxLxNxD = _FUSED[kernel](q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, keys_BxL)
    return out_BxLxNxD.reshape(x_BxLxH.shape)


class BertResidualOutput(nn.Module):
  """dense -> dropout -> + residual -> LayerNorm (HF BertSelfOutput and BertOutput)."""

  config: BertConfig
  kernel_axes: Axes
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxF: Array, residual_BxLxH: Array, deterministic: bool) -> Array:
    cfg = self.config
    y_BxLxH = _dense(cfg.hidden_size, self.kernel_axes, self.dtype, "dense")(x_BxLxF)
    y_BxLxH = nn.Dropout(cfg.hidden_dropout_prob)(y_BxLxH, deterministic=deterministic)
    return _layer_norm(cfg, self.dtype)(y_BxLxH + residual_BxLxH)


class BertAttention(nn.Module):
  """Self-attention followed by its residual output block."""

  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    attended_BxLxH = BertSelfAttention(self.config, self.dtype, self.attention, name="self")(
        x_BxLxH, mask_bias_Bx1x1xL, deterministic)
    return BertResidualOutput(self.config, ("heads", "embed"), self.dtype, name="output")(
        attended_BxLxH, x_BxLxH, deterministic)


class BertIntermediate(nn.Module):
  """dense to intermediate_size followed by the exact erf GELU."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH: Array) -> Array:
    y_BxLxI = _dense(self.config.intermediate_size, ("embed", "mlp"), self.dtype, "dense")(x_BxLxH)
    return jax.nn.gelu(y_BxLxI, approximate=False)


class BertLayer(nn.Module):
  """One post-LN transformer layer."""

  config: BertConfig
  dtype: Any = jnp.float32
  attention: str = "auto"

  @nn.compact
  def __call__(self, x_BxLxH: Array, mask_bias_Bx1x1xL: Array, deterministic: bool) -> Array:
    cfg = self.config
    x_BxLxH = BertAttention(cfg, self.dtype, self.attention, name="attention")(
        x_BxLxH, mask_bias_Bx1x1xL, deterministic)
    y_BxLxI = BertIntermediate(cfg, self.dtype, name="intermediate")(x_BxLxH)
    return BertResidualOutput(cfg, ("mlp", "embed"), self.dtype, name="output")(
        y_BxLxI, x_BxLxH, deterministic)


class BertLayerStack(nn.Module):
  """num_hidden_layers BertLayers named layer_{i}, each rematerialised under the `remat` policy.

  Between layers the hidden states are constrained to the logical axes ACTIVATION_AXES (split along
  'batch' only) where logical-axis rules are in effect (`nn.logical_axis_rules`, as in the train step):
  otherwise XLA may follow the FSDP-sharded weights and move activations instead of gathering weights.
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
    x_BxLxH = nn.with_logical_constraint(x_BxLxH, ACTIVATION_AXES)
    for i in range(self.config.num_hidden_layers):
      x_BxLxH = layer_cls(self.config, self.dtype, self.attention, name=f"layer_{i}")(
          x_BxLxH, mask_bias_Bx1x1xL, deterministic)
      x_BxLxH = nn.with_logical_constraint(x_BxLxH, ACTIVATION_AXES)
    return x_BxLxH


class BertPooler(nn.Module):
  """tanh(dense(hidden state of the first token))."""

  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxH: Array) -> Array:
    y_BxH = _dense(self.config.hidden_size, ("embed", "mlp"), self.dtype, "dense")(x_BxLxH[:, 0])
    return jnp.tanh(y_BxH)


def attention_mask_bias(attention_mask_BxL: Array) -> Array:
  """Additive float32 key mask as HF builds it: 0 where attended, finfo(float32).min elsewhere."""
  keep_BxL = attention_mask_BxL.astype(bool)
  bias_BxL = jnp.where(keep_BxL, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
  return bias_BxL[:, None, None, :]


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
    attention: one of ATTENTION_KERNELS, 'auto' choosing per platform (see BertSelfAttention).
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
