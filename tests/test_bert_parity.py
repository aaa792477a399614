"""BertEncoder vs PyTorch `transformers.BertModel`: outputs, remat, bf16, dropout, axis names."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from pairdistill_jax.convert import hf_to_flax, import_bert
from pairdistill_jax.models import bert
from pairdistill_jax.models.bert import BertConfig, BertEncoder

SMALL = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
LENGTHS = (12, 7, 3)  # real tokens per row; the rest of each row is padding


def _torch_bert(config: BertConfig, attn: str = "eager", seed: int = 0) -> transformers.BertModel:
  """A seeded BertModel with every parameter random (LayerNorm scales too, so swaps show)."""
  torch.manual_seed(seed)
  model = transformers.BertModel._from_config(
      transformers.BertConfig(**config.to_hf_dict()), attn_implementation=attn)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
  return model.eval()


def _batch(config: BertConfig, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  length = max(LENGTHS)
  mask = (np.arange(length)[None, :] < np.array(LENGTHS)[:, None]).astype(np.int64)
  ids = rng.integers(1, config.vocab_size, size=mask.shape) * mask
  types = (np.arange(length)[None, :] >= np.array(LENGTHS)[:, None] // 2) * mask
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types.astype(np.int64)}


def _torch_outputs(model, batch) -> tuple[np.ndarray, np.ndarray]:
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _params_from_torch(model, config: BertConfig) -> dict:
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, unplaced = hf_to_flax(state, config)
  assert unplaced == []
  return params


@functools.cache
def _encoder_fn(config: BertConfig, **kwargs):
  """A jitted BertEncoder.apply (op-by-op dispatch would dominate these tests' run time)."""
  model = BertEncoder(config, **kwargs)
  return jax.jit(lambda params, batch: model.apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))


def _apply(params, batch, config=SMALL, **kwargs):
  return _encoder_fn(config, **kwargs)(params, batch)


def _init_shapes(config: BertConfig, **kwargs):
  """The boxed parameter tree of BertEncoder.init, as shapes only."""
  ids = jnp.ones((2, 5), jnp.int32)
  return jax.eval_shape(BertEncoder(config, **kwargs).init, jax.random.key(0), ids, ids)["params"]


@pytest.fixture(scope="module")
def small():
  model = _torch_bert(SMALL)
  return model, _params_from_torch(model, SMALL), _batch(SMALL)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_small_random_bert_matches_torch(attn):
  model = _torch_bert(SMALL, attn)
  batch = _batch(SMALL)
  want_hidden, want_pooled = _torch_outputs(model, batch)
  hidden, pooled = _apply(_params_from_torch(model, SMALL), batch)
  valid = batch["attention_mask"].astype(bool)
  assert np.abs(np.asarray(hidden) - want_hidden)[valid].max() <= 1e-5
  assert np.abs(np.asarray(hidden) - want_hidden).max() <= 1e-5
  assert np.abs(np.asarray(pooled) - want_pooled).max() <= 1e-5


def test_token_types_default_to_zero(small):
  model, params, batch = small
  zero_types = {**batch, "token_type_ids": np.zeros_like(batch["token_type_ids"])}
  want_hidden, _ = _torch_outputs(model, zero_types)
  hidden, _ = jax.jit(BertEncoder(SMALL).apply)({"params": params}, batch["input_ids"],
                                                batch["attention_mask"])
  assert np.abs(np.asarray(hidden) - want_hidden).max() <= 1e-5


def test_without_pooling_layer_returns_none(small):
  _, params, batch = small
  config = BertConfig(**{**SMALL.__dict__, "add_pooling_layer": False})
  no_pooler = {k: v for k, v in params.items() if k != "pooler"}
  hidden, pooled = _apply(no_pooler, batch, config)
  assert pooled is None
  assert np.array_equal(np.asarray(hidden), np.asarray(_apply(params, batch)[0]))


def test_minilm_matches_torch(minilm_dir):
  sentences = ["What is the capital of France?",
               "Paris is the capital and most populous city of France.",
               "Dense retrieval distils relevance from cross-encoders."]
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  batch = dict(tokenizer(sentences, padding=True, return_tensors="np"))
  assert batch["attention_mask"].min() == 0  # the batch really has padding
  model = transformers.BertModel.from_pretrained(minilm_dir).eval()
  want_hidden, want_pooled = _torch_outputs(model, batch)
  want_hidden64, _ = _torch_outputs(model.double(), batch)

  config, params, extra = import_bert(minilm_dir)
  assert extra == {}
  hidden, pooled = (np.asarray(x) for x in _apply(params, batch, config))
  valid = batch["attention_mask"].astype(bool)
  assert np.abs(hidden - want_hidden)[valid].max() <= 1e-4
  assert np.abs(hidden - want_hidden64).max() <= 1e-4  # padded positions too, against float64
  assert np.abs(pooled - want_pooled).max() <= 1e-4


def test_remat_same_names_outputs_and_gradients(small):
  _, params, batch = small
  assert jax.tree.structure(_init_shapes(SMALL)) == jax.tree.structure(
      _init_shapes(SMALL, remat="full"))

  def loss(p, remat):
    hidden, pooled = _apply(p, batch, remat=remat)
    return jnp.sum(jnp.sin(hidden)) + jnp.sum(pooled**2)

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, grads = value_and_grad(params, "none")
  value_remat, grads_remat = value_and_grad(params, "full")
  np.testing.assert_allclose(value_remat, value, rtol=1e-6)
  for g, g_remat in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
    np.testing.assert_allclose(g_remat, g, rtol=1e-5, atol=1e-5)
  assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))


def test_bfloat16_compute_keeps_float32_params(small):
  _, params, batch = small
  shapes = nn.meta.unbox(_init_shapes(SMALL, dtype=jnp.bfloat16))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  hidden, pooled = _apply(params, batch, dtype=jnp.bfloat16)
  assert hidden.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
  hidden32, pooled32 = _apply(params, batch)
  assert np.abs(np.asarray(hidden, np.float32) - np.asarray(hidden32)).max() <= 0.1
  assert np.abs(np.asarray(pooled, np.float32) - np.asarray(pooled32)).max() <= 0.05


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2**-8)])
def test_gelu_is_the_exact_erf_gelu_in_either_dtype(dtype, rtol):
  """Against float64 math.erf on the inputs as rounded to the dtype: in bfloat16 within its rounding, negative
  inputs included (1 + erf computed in bfloat16 would be 3% off at x = -2). Below x = -5.3, 1 + erf rounds to 0
  in float32, as in PyTorch's formula: an absolute error under 2e-6 where GELU is tinier still."""
  x = jnp.asarray(np.linspace(-7.0, 4.0, 1101), dtype)
  x64 = np.asarray(x, np.float64)
  want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x64])
  got = bert._gelu(x)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=2e-6)


def test_dropout_active_and_reproducible(small):
  _, params, batch = small
  model = BertEncoder(SMALL)
  apply = jax.jit(model.apply, static_argnames="deterministic")

  def run(seed):
    hidden, _ = apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                      deterministic=False, rngs={"dropout": jax.random.key(seed)})
    return np.asarray(hidden)

  clean, _ = apply({"params": params}, batch["input_ids"], batch["attention_mask"])
  assert np.abs(run(1) - np.asarray(clean)).max() > 1e-2
  assert np.array_equal(run(1), run(1))
  assert not np.array_equal(run(1), run(2))


# The logical axis names the design fixes for each parameter (path regex -> names).
EXPECTED_AXES = {
    r"embeddings/word_embeddings/embedding": ("vocab", "embed"),
    r"embeddings/(position|token_type)_embeddings/embedding": (None, "embed"),
    r"(embeddings|encoder/layer_\d+/(attention/)?output)/LayerNorm/(scale|bias)": ("embed",),
    r"encoder/layer_\d+/attention/self/(query|key|value)/kernel": ("embed", "heads"),
    r"encoder/layer_\d+/attention/self/(query|key|value)/bias": ("heads",),
    r"encoder/layer_\d+/attention/output/dense/kernel": ("heads", "embed"),
    r"encoder/layer_\d+/(attention/)?output/dense/bias": ("embed",),
    r"encoder/layer_\d+/intermediate/dense/kernel": ("embed", "mlp"),
    r"(encoder/layer_\d+/intermediate|pooler)/dense/bias": ("mlp",),
    r"encoder/layer_\d+/output/dense/kernel": ("mlp", "embed"),
    r"pooler/dense/kernel": ("embed", "mlp"),
}


@pytest.mark.parametrize("remat", ["none", "full"])
def test_every_parameter_has_the_design_logical_axes(remat):
  leaves = jax.tree_util.tree_flatten_with_path(
      _init_shapes(SMALL, remat=remat), is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]
  assert len(leaves) == 5 + 16 * SMALL.num_hidden_layers + 2
  for path, leaf in leaves:
    name = "/".join(k.key for k in path)
    assert isinstance(leaf, nn.LogicallyPartitioned), name
    assert len(leaf.names) == leaf.value.ndim, name
    assert set(leaf.names) <= {"vocab", "embed", "heads", "mlp", None}, name
    matches = [axes for pattern, axes in EXPECTED_AXES.items() if re.fullmatch(pattern, name)]
    assert matches == [leaf.names], name


def test_too_long_input_is_rejected(small):
  _, params, _ = small
  ids = np.ones((1, SMALL.max_position_embeddings + 1), np.int32)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    BertEncoder(SMALL).apply({"params": params}, ids, ids)


@pytest.mark.parametrize("key,value", [("hidden_act", "gelu_new"),
                                       ("position_embedding_type", "relative_key")])
def test_config_rejects_unsupported_variants(key, value):
  with pytest.raises(ValueError, match=value):
    BertConfig.from_hf_dict({**SMALL.to_hf_dict(), key: value})


def test_config_hf_dict_round_trip(tmp_path):
  path = tmp_path / "config.json"
  transformers.BertConfig(**SMALL.to_hf_dict()).to_json_file(path)
  assert BertConfig.from_json_file(path) == SMALL
  assert BertConfig.from_hf_dict({"hidden_size": 64, "num_attention_heads": 4, "foo": 1}) == \
      BertConfig(hidden_size=64, num_attention_heads=4)
