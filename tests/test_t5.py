"""T5Scorer and the T5 weight table vs PyTorch `transformers.T5ForConditionalGeneration`."""

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from configs import common
from pairdistill_jax import sharding
from pairdistill_jax.convert import hf_io
from pairdistill_jax.convert.t5_table import flax_to_hf, hf_to_flax, import_t5
from pairdistill_jax.models.t5 import T5Config, T5Scorer, num_params, relative_position_bucket

# d_kv * num_heads != d_model, and few buckets with a short max distance, so that inner_dim mix-ups,
# the logarithmic buckets and their clipping all show on short sequences.
_SMALL = dict(vocab_size=200, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3,
              num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=12)
V10 = T5Config(**_SMALL, feed_forward_proj="relu", tie_word_embeddings=True)
V11 = T5Config(**_SMALL, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
               decoder_start_token_id=3)
LENGTHS = (11, 16, 3, 7)  # real tokens per row; the rest of each row is padding
TOKENS = (17, 5)  # stand-ins for "true" / "false"


def _torch_t5(config: T5Config, seed: int = 0) -> transformers.T5ForConditionalGeneration:
  """A seeded HF T5 with random RMS-norm scales and, when untied, its own random lm_head."""
  torch.manual_seed(seed)
  model = transformers.T5ForConditionalGeneration._from_config(
      transformers.T5Config(**config.to_hf_dict()), attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    if not config.tie_word_embeddings:  # transformers 5 ties every fresh T5; untie as a v1.1 load does
      model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
  return model.eval()


def _batch(config: T5Config, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = (np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]).astype(np.int32)
  ids = rng.integers(1, config.vocab_size, size=mask.shape) * mask
  return {"input_ids": ids.astype(np.int32), "attention_mask": mask}


def _torch_logits(model, config: T5Config, batch) -> np.ndarray:
  """First-decoder-step logits [B, vocab] with decoder input [decoder_start_token_id] per row."""
  rows = batch["input_ids"].shape[0]
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                decoder_input_ids=torch.full((rows, 1), config.decoder_start_token_id))
  return out.logits[:, 0].numpy()


@functools.cache
def _scorer_fn(config: T5Config, dtype=jnp.float32, token_ids=None):
  model = T5Scorer(config, dtype)
  return jax.jit(lambda params, ids, mask: model.apply({"params": params}, ids, mask, token_ids))


def _apply(config, params, batch, dtype=jnp.float32, token_ids=None) -> np.ndarray:
  return np.asarray(_scorer_fn(config, dtype, token_ids)(params, batch["input_ids"],
                                                         batch["attention_mask"]))


def _init_shapes(config: T5Config, dtype=jnp.float32):
  """The boxed parameter tree of T5Scorer.init, as shapes only."""
  ids = jnp.ones((2, 5), jnp.int32)
  return jax.eval_shape(T5Scorer(config, dtype).init, jax.random.key(0), ids, ids)["params"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{name: (HF model, its save_pretrained directory, HF logits of the test batch)}."""
  out = {}
  for name, config in (("v1.0", V10), ("v1.1", V11)):
    model = _torch_t5(config)
    directory = tmp_path_factory.mktemp(name)
    model.save_pretrained(directory)
    out[name] = model, directory, _torch_logits(model, config, _batch(config))
  return out


@pytest.mark.parametrize("name, config", [("v1.0", V10), ("v1.1", V11)])
def test_first_decoder_step_matches_torch(checkpoints, name, config):
  model, directory, want = checkpoints[name]
  imported, params = import_t5(directory)
  assert imported == config
  batch = _batch(config)
  assert np.abs(_apply(config, params, batch) - want).max() <= 1e-4
  assert np.abs(_apply(config, params, batch, token_ids=TOKENS) - want[:, TOKENS]).max() <= 1e-4
  assert num_params(config) == model.num_parameters()


def test_bfloat16_compute_close_to_float32(checkpoints):
  _, directory, want = checkpoints["v1.0"]
  _, params = import_t5(directory)
  shapes = nn.meta.unbox(_init_shapes(V10, jnp.bfloat16))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  logits = _apply(V10, params, _batch(V10), jnp.bfloat16, TOKENS)
  assert logits.dtype == np.float32
  want_logp = jax.nn.log_softmax(want[:, TOKENS], axis=-1)
  assert np.abs(jax.nn.log_softmax(logits, axis=-1) - want_logp).max() <= 0.05


def _mesh_and_rules(data: int, fsdp: int, tensor: int):
  config = ml_collections.ConfigDict({"mesh": dict(data=data, fsdp=fsdp, tensor=tensor),
                                      "sharding_rules": common.sharding_rules()})
  return sharding.make_mesh(config), sharding.rules(config)


def test_sharded_matches_torch(checkpoints):
  _, directory, want = checkpoints["v1.1"]
  _, params = import_t5(directory)
  mesh, rules = _mesh_and_rules(data=2, fsdp=2, tensor=2)
  param_sh = sharding.tree_shardings(_init_shapes(V11), mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  model = T5Scorer(V11)

  def run(p, ids, mask):
    with nn.logical_axis_rules(rules):
      return model.apply({"params": p}, ids, mask)

  with jax.set_mesh(mesh):
    placed = jax.device_put(params, param_sh)
    batch = jax.device_put(_batch(V11), batch_sh)
    logits = jax.jit(run, in_shardings=(param_sh, batch_sh, batch_sh))(
        placed, batch["input_ids"], batch["attention_mask"])
  q_sharding = placed["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"].sharding
  assert q_sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert np.abs(np.asarray(logits) - want).max() <= 1e-4


def test_fsdp8_splits_every_matrix_eight_ways(checkpoints):
  _, directory, _ = checkpoints["v1.1"]
  _, params = import_t5(directory)
  mesh, rules = _mesh_and_rules(data=1, fsdp=8, tensor=1)
  placed = jax.device_put(params, sharding.tree_shardings(_init_shapes(V11), mesh, rules))
  d, v, inner, ff = V11.d_model, V11.vocab_size, V11.inner_dim, V11.d_ff
  flat = traverse_util.flatten_dict(placed, sep="/")
  expected = {
      "shared/embedding": (v, d // 8),
      "lm_head/kernel": (d // 8, v),
      "encoder/block_1/layer_0/SelfAttention/q/kernel": (d // 8, inner),
      "encoder/block_1/layer_0/SelfAttention/o/kernel": (inner, d // 8),
      "decoder/block_2/layer_1/EncDecAttention/k/kernel": (d // 8, inner),
      "decoder/block_0/layer_2/DenseReluDense/wi_1/kernel": (d // 8, ff),
      "decoder/block_0/layer_2/DenseReluDense/wo/kernel": (ff, d // 8),
  }
  for path, shape in expected.items():
    assert {s.data.shape for s in flat[path].addressable_shards} == {shape}, path
  for path, x in flat.items():
    if x.ndim == 2 and "relative_attention_bias" not in path:
      assert len(x.addressable_shards) == 8
      assert all(s.data.size * 8 == x.size for s in x.addressable_shards), path


def test_every_parameter_has_logical_axes():
  for config in (V10, V11):
    boxed = _init_shapes(config)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)


@pytest.mark.parametrize("name, config", [("v1.0", V10), ("v1.1", V11)])
def test_table_round_trip(checkpoints, name, config):
  model, directory, _ = checkpoints[name]
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  params, unplaced = hf_to_flax(state, config)
  assert unplaced == []
  back = flax_to_hf(params, config)
  saved = hf_io.read_state_dict(directory)
  assert back.keys() == saved.keys()
  copies = {"encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
  if config.tie_word_embeddings:
    copies.add("lm_head.weight")
  assert back.keys() == state.keys() - copies
  for key, value in back.items():
    assert np.array_equal(value, state[key]), key


def test_missing_or_mismatched_keys_are_named(checkpoints):
  model, _, _ = checkpoints["v1.1"]
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  missing = "decoder.block.2.layer.1.EncDecAttention.k.weight"
  with pytest.raises(ValueError, match=f"missing {missing}"):
    hf_to_flax({k: v for k, v in state.items() if k != missing}, V11)
  with pytest.raises(ValueError, match="encoder.block.0.layer.1.DenseReluDense.wo.weight: expected"):
    hf_to_flax({**state, "encoder.block.0.layer.1.DenseReluDense.wo.weight": np.zeros((3, 3))}, V11)
  with pytest.raises(ValueError, match="decoder.embed_tokens.weight differs from shared.weight"):
    hf_to_flax({**state, "decoder.embed_tokens.weight": state["shared.weight"] + 1}, V11)
  with pytest.raises(ValueError, match="missing lm_head.weight"):
    hf_to_flax({k: v for k, v in state.items() if k != "lm_head.weight"}, V11)
  _, unplaced = hf_to_flax({**state, "decoder.extra.weight": np.zeros(2)}, V11)
  assert unplaced == ["decoder.extra.weight"]


def test_import_rejects_unknown_tensors(checkpoints, tmp_path):
  _, directory, _ = checkpoints["v1.0"]
  state = hf_io.read_state_dict(directory)
  hf_io.write_safetensors(tmp_path / hf_io.SAFETENSORS, {**state, "score.weight": np.zeros((2, 32))})
  (tmp_path / hf_io.CONFIG).write_text((directory / hf_io.CONFIG).read_text())
  with pytest.raises(ValueError, match="score.weight"):
    import_t5(tmp_path)


def test_old_checkpoint_with_unused_cross_attention_bias_imports(checkpoints, tmp_path):
  _, directory, _ = checkpoints["v1.0"]
  state = hf_io.read_state_dict(directory)
  unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
  hf_io.write_safetensors(tmp_path / hf_io.SAFETENSORS, {**state, unused: np.ones((8, 4))})
  (tmp_path / hf_io.CONFIG).write_text((directory / hf_io.CONFIG).read_text())
  config, params = import_t5(tmp_path)
  assert config == V10
  assert "relative_attention_bias" not in params["decoder"]["block_0"]["layer_1"]["EncDecAttention"]


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (8, 12), (6, 20)])
def test_relative_position_bucket_matches_hf(bidirectional, num_buckets, max_distance):
  relative = np.arange(-700, 700)
  want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
      torch.from_numpy(relative), bidirectional, num_buckets, max_distance).numpy()
  got = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
  assert np.array_equal(got, want)


def test_config_reads_hf_dicts_like_transformers():
  legacy_v11 = {"model_type": "t5", "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False,
                "d_model": 64, "num_layers": 3, "decoder_start_token_id": 0}
  config = T5Config.from_hf_dict(legacy_v11)
  assert (config.tie_word_embeddings, config.scale_decoder_outputs) == (False, False)
  assert config.num_decoder_layers == 3
  assert dataclasses.replace(V10, num_decoder_layers=None).num_decoder_layers == V10.num_layers
  saved_by_transformers5 = {**legacy_v11, "tie_word_embeddings": True, "scale_decoder_outputs": False}
  assert T5Config.from_hf_dict(saved_by_transformers5).scale_decoder_outputs is False
  v10 = T5Config.from_hf_dict({"pad_token_id": 7})
  assert (v10.tie_word_embeddings, v10.scale_decoder_outputs, v10.decoder_start_token_id) == (True, True, 7)
  for config in (V10, V11):
    assert T5Config.from_hf_dict(config.to_hf_dict()) == config
    hf = transformers.T5Config(**config.to_hf_dict())
    assert (hf.scale_decoder_outputs, hf.is_gated_act, hf.num_decoder_layers) == (
        config.scale_decoder_outputs, config.is_gated, config.num_decoder_layers)
    assert hf.dense_act_fn == ("gelu_new" if config.is_gated else "relu")


def test_config_rejects_unsupported_settings(tmp_path):
  with pytest.raises(ValueError, match="feed_forward_proj 'gated-silu'"):
    T5Config.from_hf_dict({"feed_forward_proj": "gated-silu"})
  with pytest.raises(ValueError, match="model_type 'umt5'"):
    T5Config.from_hf_dict({"model_type": "umt5"})
  bad = tmp_path / "config.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    T5Config.from_json_file(bad)
  bad.write_text(json.dumps({"feed_forward_proj": "gelu"}))
  with pytest.raises(ValueError, match=f"{bad}: feed_forward_proj 'gelu'"):
    T5Config.from_json_file(bad)


def test_token_ids_out_of_range_are_rejected():
  ids = jnp.ones((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="token_ids must be"):
    T5Scorer(V10).init(jax.random.key(0), ids, ids, (5, V10.vocab_size))
