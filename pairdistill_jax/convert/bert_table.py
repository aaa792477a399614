"""The HF PyTorch <-> Flax BERT weight table, read by both conversion directions.

Each rule names an HF state-dict key and the BertEncoder parameter path it maps to (`{i}` is the
layer index: HF `encoder.layer.{i}` <-> Flax `encoder/layer_{i}`), the Flax-side shape in config
dimensions, and the transform (HF Linear weights are [out, in], Flax kernels [in, out]).
"""

import dataclasses
import enum
from collections.abc import Mapping

import flax.linen as nn
import numpy as np
from flax import traverse_util

from pairdistill_jax.models.bert import BertConfig


class Transform(enum.Enum):
  IDENTITY = "identity"
  TRANSPOSE = "transpose"

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return x.T if self is Transform.TRANSPOSE else x


@dataclasses.dataclass(frozen=True)
class Rule:
  hf: str  # HF key template, '.'-separated
  flax: str  # Flax parameter path template, '/'-separated
  shape: tuple[str, ...]  # Flax-side shape as config field names (BertConfig, T5Config)
  transform: Transform


_V, _P, _T = "vocab_size", "max_position_embeddings", "type_vocab_size"
_H, _I = "hidden_size", "intermediate_size"


def _embedding(hf: str, flax: str, rows: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{flax}/embedding", (rows, _H), Transform.IDENTITY),)


def _layer_norm(hf: str, flax: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{flax}/scale", (_H,), Transform.IDENTITY),
          Rule(f"{hf}.bias", f"{flax}/bias", (_H,), Transform.IDENTITY))


def _linear(hf: str, flax: str, fan_in: str, fan_out: str) -> tuple[Rule, ...]:
  return (Rule(f"{hf}.weight", f"{flax}/kernel", (fan_in, fan_out), Transform.TRANSPOSE),
          Rule(f"{hf}.bias", f"{flax}/bias", (fan_out,), Transform.IDENTITY))


EMBEDDING_RULES: tuple[Rule, ...] = (
    *_embedding("embeddings.word_embeddings", "embeddings/word_embeddings", _V),
    *_embedding("embeddings.position_embeddings", "embeddings/position_embeddings", _P),
    *_embedding("embeddings.token_type_embeddings", "embeddings/token_type_embeddings", _T),
    *_layer_norm("embeddings.LayerNorm", "embeddings/LayerNorm"),
)

_HF_LAYER, _FLAX_LAYER = "encoder.layer.{i}", "encoder/layer_{i}"
LAYER_RULES: tuple[Rule, ...] = (
    *_linear(f"{_HF_LAYER}.attention.self.query", f"{_FLAX_LAYER}/attention/self/query", _H, _H),
    *_linear(f"{_HF_LAYER}.attention.self.key", f"{_FLAX_LAYER}/attention/self/key", _H, _H),
    *_linear(f"{_HF_LAYER}.attention.self.value", f"{_FLAX_LAYER}/attention/self/value", _H, _H),
    *_linear(f"{_HF_LAYER}.attention.output.dense", f"{_FLAX_LAYER}/attention/output/dense",
             _H, _H),
    *_layer_norm(f"{_HF_LAYER}.attention.output.LayerNorm",
                 f"{_FLAX_LAYER}/attention/output/LayerNorm"),
    *_linear(f"{_HF_LAYER}.intermediate.dense", f"{_FLAX_LAYER}/intermediate/dense", _H, _I),
    *_linear(f"{_HF_LAYER}.output.dense", f"{_FLAX_LAYER}/output/dense", _I, _H),
    *_layer_norm(f"{_HF_LAYER}.output.LayerNorm", f"{_FLAX_LAYER}/output/LayerNorm"),
)

POOLER_RULES: tuple[Rule, ...] = _linear("pooler.dense", "pooler/dense", _H, _H)

# LayerNorm parameter names of the TF BERT release, which some published PyTorch checkpoints still carry (e.g.
# bert-base-uncased's pytorch_model.bin): HF name suffix -> TF name suffix; import reads either.
LEGACY_SUFFIXES: Mapping[str, str] = {"LayerNorm.weight": "LayerNorm.gamma",
                                      "LayerNorm.bias": "LayerNorm.beta"}
# Non-parameter buffers some checkpoints store; they carry no weights.
IGNORED_BUFFERS: tuple[str, ...] = ("embeddings.position_ids", "embeddings.token_type_ids")


@dataclasses.dataclass(frozen=True)
class Entry:
  """One rule instantiated for a config: concrete key, path and Flax-side shape."""

  hf: str
  flax: str
  shape: tuple[int, ...]
  transform: Transform

  @property
  def hf_shape(self) -> tuple[int, ...]:
    return self.shape[::-1] if self.transform is Transform.TRANSPOSE else self.shape


def expand(config: BertConfig) -> list[Entry]:
  """Every (HF key, Flax path) pair of a BertEncoder with this config."""

  def entry(rule: Rule, i: int | None = None) -> Entry:
    shape = tuple(getattr(config, dim) for dim in rule.shape)
    return Entry(rule.hf.format(i=i), rule.flax.format(i=i), shape, rule.transform)

  entries = [entry(r) for r in EMBEDDING_RULES]
  entries += [entry(r, i) for i in range(config.num_hidden_layers) for r in LAYER_RULES]
  if config.add_pooling_layer:
    entries += [entry(r) for r in POOLER_RULES]
  return entries


def _lookup(state_dict: Mapping[str, np.ndarray], key: str) -> str | None:
  """The key actually present for `key`: itself or its TF LayerNorm name."""
  if key in state_dict:
    return key
  for suffix, tf_suffix in LEGACY_SUFFIXES.items():
    if key.endswith(suffix) and (alias := key[:-len(suffix)] + tf_suffix) in state_dict:
      return alias
  return None


def hf_to_flax(state_dict: Mapping[str, np.ndarray], config: BertConfig,
               prefix: str = "") -> tuple[dict, list[str]]:
  """HF BERT tensors under `prefix` -> (BertEncoder params as float32 numpy, unplaced keys)."""
  flat, used, missing, mismatched = {}, set(), [], []
  for e in expand(config):
    key = _lookup(state_dict, prefix + e.hf)
    if key is None:
      missing.append(prefix + e.hf)
      continue
    used.add(key)
    value = np.asarray(state_dict[key])
    if value.shape != e.hf_shape:
      mismatched.append(f"{key}: expected shape {e.hf_shape}, found {value.shape}")
      continue
    flat[tuple(e.flax.split("/"))] = np.ascontiguousarray(e.transform(value), dtype=np.float32)
  raise_if_any("HF state dict does not fit the BERT config",
               [f"missing {k}" for k in missing] + mismatched)
  buffers = {prefix + b for b in IGNORED_BUFFERS}
  unplaced = sorted(k for k in state_dict
                    if k.startswith(prefix) and k not in used and k not in buffers)
  return traverse_util.unflatten_dict(flat), unplaced


def flax_to_hf(params: Mapping, config: BertConfig, prefix: str = "") -> dict[str, np.ndarray]:
  """BertEncoder params (boxed or plain, any array type) -> HF state dict of float32 numpy."""
  return params_to_state_dict(params, expand(config), "BERT", prefix)


def params_to_state_dict(params: Mapping, entries: list[Entry], model: str, prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params (boxed or plain) -> the HF tensors of `entries` as float32 numpy; every parameter must fit."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")
  missing = [e.flax for e in entries if e.flax not in flat]
  mismatched = [f"{e.flax}: expected shape {e.shape}, found {np.shape(flat[e.flax])}"
                for e in entries if e.flax in flat and np.shape(flat[e.flax]) != e.shape]
  unknown = sorted(flat.keys() - {e.flax for e in entries})
  raise_if_any(f"Flax params do not fit the {model} config",
               [f"missing {p}" for p in missing] + mismatched
               + [f"no HF name for parameter {p}" for p in unknown])
  return {prefix + e.hf: np.ascontiguousarray(e.transform(np.asarray(flat[e.flax], np.float32)))
          for e in entries}


def raise_if_any(what: str, problems: list[str]) -> None:
  if problems:
    raise ValueError(
        f"{what} ({len(problems)} problems; check the checkpoint, the prefix and the config):\n  "
        + "\n  ".join(problems))
