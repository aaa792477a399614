"""The attention kernels of the BERT encoder (`model.attention`) and the choice 'auto' makes per platform.

  einsum                 softmax attention as two einsums, heads-major (the XLA formulation); the only kernel with
                         attention-probability dropout
  chunked                those einsums over chunks of sequences (`lax.map`), each chunk's logits rematerialised in the
                         backward pass: memory for one chunk's logits instead of the batch's (as fast as the
                         einsums on CPU, measured)
  dot_product_attention  `jax.nn.dot_product_attention`, implementation chosen by JAX
  cudnn                  its cuDNN flash attention (NVIDIA GPUs from Ampere on, bfloat16/float16)
  pallas                 the TPU Pallas flash attention kernel, per shard of the batch and heads under a mesh
  auto                   one of the above per platform (`select_attention`)

Inputs are [B, L, N, D] queries, keys and values and HF's additive key mask (`attention_mask_bias`). Every
kernel attends from every query row (ColBERT's [MASK] padding rows too) to the keys the mask keeps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash
from jax.sharding import PartitionSpec as P

from pairdistill_jax.models.initializers import Axes

Array = jax.Array

# model.attention: 'auto' picks one of the others per platform (select_attention).
ATTENTION_KERNELS = ("auto", "einsum", "chunked", "dot_product_attention", "cudnn", "pallas")
NO_DROPOUT_ATTENTION = ("chunked", "dot_product_attention", "cudnn", "pallas")  # no attention-probability dropout
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
_CUDNN_MAX_HEAD_DIM = 128  # cuDNN flash attention on Ampere (256 from Hopper on)
_PALLAS_BLOCK = 128  # the TPU flash_attention tile: sequences are padded to a multiple of it
_CHUNK_LOGITS_BYTES = 4 << 20  # float32 logits of one chunk of sequences per device ('chunked')


def attention_mask_bias(attention_mask_BxL: Array) -> Array:
  """Additive float32 key mask as HF builds it: 0 where attended, finfo(float32).min elsewhere."""
  keep_BxL = attention_mask_BxL.astype(bool)
  bias_BxL = jnp.where(keep_BxL, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
  return bias_BxL[:, None, None, :]


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
  flash attention kernel on TPUs and the einsums elsewhere (on CPUs the chunked einsums measured as fast, not
  faster); training with attention-probability dropout (`dropout`) always takes the einsums, the only kernel
  that has it.
  platform: as `_platform()` names it (by default the platform jitted computations run on).
  """
  if attention not in ATTENTION_KERNELS:
    raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
  if attention != "auto":
    if dropout and attention in NO_DROPOUT_ATTENTION:
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
  return "einsum", f"{platform}: the einsums (the XLA formulation)"


@functools.cache
def _log_selection(kernel: str, reason: str) -> None:
  """Logs each of auto's choices once per process."""
  logging.info("model.attention='auto' runs %r: %s", kernel, reason)


def choose_kernel(attention: str, dtype: Any, head_dim: int, length: int, dropout: bool) -> str:
  """`select_attention`'s kernel on the platform jitted computations run on; auto's choice is logged once."""
  kernel, reason = select_attention(attention, dtype, head_dim, length, dropout)
  if attention == "auto":
    _log_selection(kernel, reason)
  return kernel


def _einsum_attention(q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, mask_bias_Bx1x1xL: Array,
                      dropout: Callable[[Array], Array]) -> Array:
  """Softmax attention as two einsums, heads-major ([B, N, L, D]: the fastest layout measured on CPU)."""
  q_BxNxLxD, k_BxNxLxD, v_BxNxLxD = (x.transpose(0, 2, 1, 3) for x in (q_BxLxNxD, k_BxLxNxD, v_BxLxNxD))
  logits_BxNxLxL = jnp.einsum("bnqd,bnkd->bnqk", q_BxNxLxD, k_BxNxLxD, preferred_element_type=jnp.float32)
  logits_BxNxLxL = logits_BxNxLxL * q_BxNxLxD.shape[-1]**-0.5 + mask_bias_Bx1x1xL
  probs_BxNxLxL = dropout(jax.nn.softmax(logits_BxNxLxL, axis=-1))
  out_BxNxLxD = jnp.einsum("bnqk,bnkd->bnqd", probs_BxNxLxL.astype(v_BxNxLxD.dtype), v_BxNxLxD)
  return out_BxNxLxD.transpose(0, 2, 1, 3)


def _batch_shards(batch: int) -> int:
  """How many devices the batch dimension is split over under the mesh and logical-axis rules in effect."""
  return _axes_size(jax.sharding.get_abstract_mesh(), _shard_spec(("batch",), (batch,))[0])


def chunk_count(batch: int, heads: int, length: int) -> int:
  """Into how many chunks `_chunked_attention` splits a batch: the fewest whose float32 logits on a device
  ([rows, heads, length, length]) fit _CHUNK_LOGITS_BYTES, one sequence per device at least. The count
  divides each device's rows, so that every chunk stays split over the batch shards."""
  local = batch // _batch_shards(batch)
  rows = max(1, _CHUNK_LOGITS_BYTES // (heads * length * length * 4))
  return min(m for m in range(1, local + 1) if local % m == 0 and local // m <= rows)


def _chunked_attention(q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, mask_bias_Bx1x1xL: Array) -> Array:
  """`_einsum_attention` over strided chunks of sequences (chunk i: rows i, i + C, ...; `chunk_count`), one
  after the other (`lax.map`), so that only one chunk's logits exist at a time. Each chunk is rematerialised
  for the backward pass (its logits recomputed, not stored). Alone it runs 2x as fast as the einsums on CPU
  (its logits stay in cache); inside the encoder and the train step it measured as fast, not faster."""
  batch, length, heads, _ = q_BxLxNxD.shape
  chunks = chunk_count(batch, heads, length)

  def split(x: Array) -> Array:
    return x.reshape(batch // chunks, chunks, *x.shape[1:]).swapaxes(0, 1)

  attend_chunk = jax.checkpoint(lambda qkvb: _einsum_attention(*qkvb, dropout=lambda p: p))
  inputs = (q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_bias_Bx1x1xL)
  out_CxRxLxNxD = jax.lax.map(attend_chunk, tuple(split(x) for x in inputs))
  return out_CxRxLxNxD.swapaxes(0, 1).reshape(q_BxLxNxD.shape)


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


def _axes_size(mesh: Any, axes: str | tuple[str | None, ...] | None) -> int:
  """How many devices the mesh axes `axes` (a PartitionSpec entry) span: 1 for None."""
  names = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[n] for n in names if n is not None)


def _shard_spec(logical: Axes, shape: tuple[int, ...]) -> P:
  """The mesh axes of `logical` under the logical-axis rules and mesh in effect; None where they do not
  divide the dimension."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return P(*(None for _ in shape))
  spec = []
  for axes, size in zip(nn.logical_to_mesh_axes(logical), shape):
    spec.append(axes if axes is not None and size % _axes_size(mesh, axes) == 0 else None)
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


def attend(kernel: str, q_BxLxNxD: Array, k_BxLxNxD: Array, v_BxLxNxD: Array, mask_bias_Bx1x1xL: Array,
           dropout: Callable[[Array], Array]) -> Array:
  """Softmax attention of the queries over the keys `mask_bias_Bx1x1xL` keeps, by `kernel` (one of
  ATTENTION_KERNELS but 'auto': see `choose_kernel`); `dropout` applies to the einsums' probabilities."""
  if kernel == "einsum":
    return _einsum_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_bias_Bx1x1xL, dropout)
  if kernel == "chunked":
    return _chunked_attention(q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, mask_bias_Bx1x1xL)
  q_BxLxNxD, keys_BxL = _fused_inputs(q_BxLxNxD, mask_bias_Bx1x1xL)
  return _FUSED[kernel](q_BxLxNxD, k_BxLxNxD, v_BxLxNxD, keys_BxL)
