"""The HF PyTorch <-> Flax T5 weight table, read by both conversion directions, and the T5 importer.

Each rule names an HF `T5ForConditionalGeneration` state-dict key and the T5Scorer parameter path it maps
to (`{i}` is the block index: HF `encoder.block.{i}.layer.{j}` <-> Flax `encoder/block_{i}/layer_{j}`),
the Flax-side shape in T5Config dimensions, and the transform (HF Linear weights are [out, in], Flax
kernels [in, out]). The embedding copies HF ties to `shared.weight` are accepted when equal to it.
"""

import dataclasses
import pathlib
from collections.abc import Mapping

import numpy as np
from flax import traverse_util

from pairdistill_jax.convert import hf_io
from pairdistill_jax.convert.bert_table import Entry, Rule, Transform, params_to_state_dict, raise_if_any
from pairdistill_jax.models.t5 import T5Config


_V, _D, _I, _F = "vocab_size", "d_model", "inner_dim", "d_ff"
_BUCKETS, _HEADS = "relative_attention_num_buckets", "num_heads"
SHARED = "shared.weight"
LM_HEAD = "lm_head.weight"


def _linear(hf: str, flax: str, fan_in: str, fan_out: str) -> Rule:
  return Rule(f"{hf}.weight", f"{flax}/kernel", (fan_in, fan_out), Transform.TRANSPOSE)


def _norm(hf: str, flax: str) -> Rule:
  return Rule(f"{hf}.weight", f"{flax}/scale", (_D,), Transform.IDENTITY)


def _attention(hf: str, flax: str) -> tuple[Rule, ...]:
  return (*(_linear(f"{hf}.{name}", f"{flax}/{name}", _D, _I) for name in ("q", "k", "v")),
          _linear(f"{hf}.o", f"{flax}/o", _I, _D))


def _feed_forward(hf: str, flax: str, gated: bool) -> tuple[Rule, ...]:
  wi = ("wi_0", "wi_1") if gated else ("wi",)
  return (*(_linear(f"{hf}.DenseReluDense.{name}", f"{flax}/DenseReluDense/{name}", _D, _F)
            for name in wi),
          _linear(f"{hf}.DenseReluDense.wo", f"{flax}/DenseReluDense/wo", _F, _D),
          _norm(f"{hf}.layer_norm", f"{flax}/layer_norm"))


def _block(stack: str, gated: bool) -> tuple[Rule, ...]:
  """The rules of block {i} of 'encoder' or 'decoder'."""
  hf, flax = f"{stack}.block.{{i}}.layer", f"{stack}/block_{{i}}/layer_"
  rules = [*_attention(f"{hf}.0.SelfAttention", f"{flax}0/SelfAttention"),
           _norm(f"{hf}.0.layer_norm", f"{flax}0/layer_norm")]
  ff = 1
  if stack == "decoder":
    rules += [*_attention(f"{hf}.1.EncDecAttention", f"{flax}1/EncDecAttention"),
              _norm(f"{hf}.1.layer_norm", f"{flax}1/layer_norm")]
    ff = 2
  return (*rules, *_feed_forward(f"{hf}.{ff}", f"{flax}{ff}", gated))


def _stack(stack: str) -> tuple[Rule, ...]:
  """The rules of a stack outside its blocks: block 0's relative bias and the final norm."""
  bias = Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
              f"{stack}/block_0/layer_0/SelfAttention/relative_attention_bias/embedding",
              (_BUCKETS, _HEADS), Transform.IDENTITY)
  return bias, _norm(f"{stack}.final_layer_norm", f"{stack}/final_layer_norm")


EMBEDDING_RULES: tuple[Rule, ...] = (Rule(SHARED, "shared/embedding", (_V, _D), Transform.IDENTITY),)
LM_HEAD_RULES: tuple[Rule, ...] = (Rule(LM_HEAD, "lm_head/kernel", (_D, _V), Transform.TRANSPOSE),)
STACK_RULES: tuple[Rule, ...] = (*_stack("encoder"), *_stack("decoder"))
BLOCK_RULES: Mapping[tuple[str, bool], tuple[Rule, ...]] = {
    (stack, gated): _block(stack, gated) for stack in ("encoder", "decoder") for gated in (False, True)}
# Copies of shared.weight in HF state dicts (lm_head.weight too, when the head is tied).
TIED_COPIES: tuple[str, ...] = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Tensors some checkpoints hold that HF ignores when loading (T5 never uses them).
IGNORED_KEYS: tuple[str, ...] = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def expand(config: T5Config) -> list[Entry]:
  """Every (HF key, Flax path) pair of a T5Scorer with this config."""

  def entry(rule: Rule, i: int | None = None) -> Entry:
    shape = tuple(getattr(config, dim) for dim in rule.shape)
    return Entry(rule.hf.format(i=i), rule.flax.format(i=i), shape, rule.transform)

  entries = [entry(r) for r in EMBEDDING_RULES + STACK_RULES]
  if not config.tie_word_embeddings:
    entries += [entry(r) for r in LM_HEAD_RULES]
  for stack, blocks in (("encoder", config.num_layers), ("decoder", config.num_decoder_layers)):
    entries += [entry(r, i) for i in range(blocks) for r in BLOCK_RULES[stack, config.is_gated]]
  return entries


def _tied_copies(config: T5Config) -> tuple[str, ...]:
  return TIED_COPIES + ((LM_HEAD,) if config.tie_word_embeddings else ())


def _copy_problems(state_dict: Mapping[str, np.ndarray], config: T5Config) -> list[str]:
  """Present copies of shared.weight that differ from it."""
  if SHARED not in state_dict:
    return []
  shared = np.asarray(state_dict[SHARED])
  return [f"{key} differs from {SHARED}; T5Scorer ties them (for an untied lm_head set "
          f"tie_word_embeddings=False)" for key in _tied_copies(config)
          if key in state_dict and not np.array_equal(np.asarray(state_dict[key]), shared)]


def hf_to_flax(state_dict: Mapping[str, np.ndarray], config: T5Config) -> tuple[dict, list[str]]:
  """HF T5 tensors -> (T5Scorer params as float32 numpy, keys that fit no parameter)."""
  flat, missing, mismatched = {}, [], []
  for e in expand(config):
    if e.hf not in state_dict:
      missing.append(e.hf)
      continue
    value = np.asarray(state_dict[e.hf])
    if value.shape != e.hf_shape:
      mismatched.append(f"{e.hf}: expected shape {e.hf_shape}, found {value.shape}")
      continue
    flat[tuple(e.flax.split("/"))] = np.ascontiguousarray(e.transform(value), dtype=np.float32)
  raise_if_any("HF state dict does not fit the T5 config",
               [f"missing {k}" for k in missing] + mismatched + _copy_problems(state_dict, config))
  known = {e.hf for e in expand(config)} | set(_tied_copies(config)) | set(IGNORED_KEYS)
  return traverse_util.unflatten_dict(flat), sorted(state_dict.keys() - known)


def flax_to_hf(params: Mapping, config: T5Config) -> dict[str, np.ndarray]:
  """T5Scorer params (boxed or plain, any array type) -> HF state dict of float32 numpy.

  Tied copies of shared.weight are left out, as `save_pretrained` does.
  """
  return params_to_state_dict(params, expand(config), "T5")


def _tie_from_weights(config: T5Config, state_dict: Mapping[str, np.ndarray]) -> T5Config:
  """The config with tie_word_embeddings set by the weights, as HF's loader decides.

  transformers 5 writes tie_word_embeddings true for every T5 and leaves the head untied when the
  checkpoint's lm_head.weight differs from shared.weight; without lm_head.weight the config decides.
  """
  head, shared = state_dict.get(LM_HEAD), state_dict.get(SHARED)
  if head is None or shared is None:
    return config
  tied = head.shape == shared.shape and np.array_equal(head, shared)
  return dataclasses.replace(config, tie_word_embeddings=tied)  # the resolved scale is kept


def import_t5(directory: hf_io.PathLike) -> tuple[T5Config, dict]:
  """(config, T5Scorer params) of a HF T5ForConditionalGeneration checkpoint directory."""
  d = pathlib.Path(directory)
  if not (d / hf_io.CONFIG).is_file():
    raise FileNotFoundError(f"no {hf_io.CONFIG} in {d}; a HF checkpoint directory needs one.")
  config = T5Config.from_json_file(d / hf_io.CONFIG)
  state = hf_io.read_state_dict(d)
  config = _tie_from_weights(config, state)
  params, unplaced = hf_to_flax(state, config)
  if unplaced:
    raise ValueError(f"{d}: cannot place these tensors in a T5ForConditionalGeneration: {unplaced}; "
                     f"is this a T5 / mT5 checkpoint (not e.g. UMT5 or a T5 with extra heads)?")
  return config, params
