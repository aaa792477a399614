"""HF <-> Flax BERT conversion: the name table, checkpoint readers, importers and the exporter."""

import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import traverse_util

from pairdistill_jax.convert import (bert_prefix, export_bert, flax_to_hf, hf_to_flax, import_bert,
                                     import_colbert, read_state_dict, write_safetensors)
from pairdistill_jax.models.bert import BertConfig, BertEncoder

SMALL = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Every parameter random (LayerNorm scales too, so swapped names show) and eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.2)
  return model.eval()


def _hf_config(config: BertConfig = SMALL, **extra) -> transformers.BertConfig:
  return transformers.BertConfig(**{**config.to_hf_dict(), **extra})


def _flax_params(config: BertConfig = SMALL, seed: int = 0) -> dict:
  """Random plain float32 params with the BertEncoder tree (every leaf distinct noise)."""
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(BertEncoder(config).init, jax.random.key(0), ids, ids)["params"]
  flat = traverse_util.flatten_dict(jax.tree.map(lambda x: x.value, shapes,
                                                 is_leaf=lambda x: hasattr(x, "names")))
  rng = np.random.default_rng(seed)
  return traverse_util.unflatten_dict(
      {k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in flat.items()})


def _batch(config: BertConfig = SMALL) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(1)
  mask = (np.arange(9)[None] < np.array([[9], [5]])).astype(np.int64)
  return {"input_ids": rng.integers(1, config.vocab_size, mask.shape) * mask,
          "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}


def _flax_outputs(params, config: BertConfig = SMALL):
  batch = _batch(config)
  return jax.jit(BertEncoder(config).apply)(
      {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _torch_hidden(model) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v) for k, v in _batch().items()})[0].numpy()


def _flat(params) -> dict:
  return traverse_util.flatten_dict(params, sep="/")


def test_table_matches_transformers_names():
  hf_keys = set(transformers.BertModel(_hf_config()).state_dict()) - set(BUFFERS)
  assert set(flax_to_hf(_flax_params(), SMALL)) == hf_keys


def test_round_trip_through_safetensors_is_bitwise(tmp_path):
  params = _flax_params()
  write_safetensors(tmp_path / "model.safetensors", flax_to_hf(params, SMALL, prefix="bert."))
  back, unplaced = hf_to_flax(read_state_dict(tmp_path), SMALL, prefix="bert.")
  assert unplaced == []
  assert _flat(back).keys() == _flat(params).keys()
  for name, value in _flat(params).items():
    assert _flat(back)[name].dtype == np.float32
    assert np.array_equal(_flat(back)[name], value), name


def test_flax_to_hf_accepts_boxed_params_and_transposes_kernels():
  ids = jnp.ones((1, 4), jnp.int32)
  variables = jax.jit(BertEncoder(SMALL).init)(jax.random.key(0), ids, ids)
  tensors = flax_to_hf(variables["params"], SMALL)
  kernel = variables["params"]["encoder"]["layer_1"]["intermediate"]["dense"]["kernel"].value
  assert tensors["encoder.layer.1.intermediate.dense.weight"].shape == (37, 32)
  assert np.array_equal(tensors["encoder.layer.1.intermediate.dense.weight"], np.asarray(kernel).T)


def test_export_loads_in_transformers_and_matches(tmp_path, minilm_dir):
  params = _flax_params()
  out = tmp_path / "exported"
  export_bert(out, SMALL, params, tokenizer_dir=minilm_dir)
  model, info = transformers.BertModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"]
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  hidden, pooled = _flax_outputs(params)
  with torch.no_grad():
    want = model.eval()(**{k: torch.from_numpy(v) for k, v in _batch().items()})
  assert np.abs(np.asarray(hidden) - want.last_hidden_state.numpy()).max() <= 1e-5
  assert np.abs(np.asarray(pooled) - want.pooler_output.numpy()).max() <= 1e-5
  assert (out / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
  assert (out / "tokenizer.json").is_file()
  assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
  assert [p.name for p in tmp_path.iterdir()] == ["exported"]  # no temporary left over


def test_export_replaces_an_existing_directory(tmp_path):
  out = tmp_path / "exported"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  export_bert(out, SMALL, _flax_params(), config_extra={"architectures": ["HF_ColBERT"]})
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert json.loads((out / "config.json").read_text())["architectures"] == ["HF_ColBERT"]


def _wrong_shape_params() -> dict:
  params = _flax_params()
  params["encoder"]["layer_0"]["output"]["dense"]["kernel"] = np.zeros((5, 5), np.float32)
  return params


def test_failed_export_leaves_nothing_behind(tmp_path):
  with pytest.raises(ValueError, match=r"layer_0/output/dense/kernel.*\(37, 32\).*\(5, 5\)"):
    export_bert(tmp_path / "exported", SMALL, _wrong_shape_params())
  assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_the_existing_directory(tmp_path):
  out = tmp_path / "exported"
  out.mkdir()
  (out / "keep.txt").write_text("precious")
  with pytest.raises(ValueError):
    export_bert(out, SMALL, _wrong_shape_params())
  with pytest.raises(ValueError, match="extra_tensors would overwrite"):
    export_bert(out, SMALL, _flax_params(), extra_tensors={"pooler.dense.bias": np.zeros(32)})
  assert [p.name for p in tmp_path.iterdir()] == ["exported"]
  assert (out / "keep.txt").read_text() == "precious"


def test_failure_while_writing_removes_the_temporary(tmp_path, monkeypatch):
  out = tmp_path / "exported"
  out.mkdir()
  (out / "keep.txt").write_text("precious")

  def broken_copy(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr("shutil.copy2", broken_copy)
  with pytest.raises(OSError, match="disk full"):
    export_bert(out, SMALL, _flax_params(), tokenizer_dir=_tokenizer_dir(tmp_path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "tok"]
  assert (out / "keep.txt").read_text() == "precious"


def _tokenizer_dir(tmp_path):
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "vocab.txt").write_text("[PAD]\n")
  return tok


def test_pytorch_bin_imports(tmp_path):
  model = _randomize(transformers.BertModel(_hf_config()))
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  config, params, extra = import_bert(tmp_path)
  assert config == SMALL and extra == {}
  assert np.abs(np.asarray(_flax_outputs(params)[0]) - _torch_hidden(model)).max() <= 1e-5


def test_sharded_safetensors_import(tmp_path):
  model = _randomize(transformers.BertModel(_hf_config()))
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  _, params, _ = import_bert(tmp_path)
  assert np.abs(np.asarray(_flax_outputs(params)[0]) - _torch_hidden(model)).max() <= 1e-5


def test_half_precision_tensors_become_float32(tmp_path):
  tensors = {"bf16": torch.randn(3, 4).bfloat16(), "fp16": torch.randn(5).half(),
             "f32": torch.randn(2, 2), "ids": torch.arange(6).reshape(1, 6)}
  safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
  read = read_state_dict(tmp_path)
  for name in ("bf16", "fp16", "f32"):
    assert read[name].dtype == np.float32
    assert np.array_equal(read[name], tensors[name].float().numpy()), name
  assert read["ids"].dtype == np.int64 and np.array_equal(read["ids"], tensors["ids"].numpy())


def test_sequence_classification_checkpoint_keeps_classifier_as_extra(tmp_path):
  model = _randomize(transformers.BertForSequenceClassification(_hf_config(num_labels=1)))
  model.save_pretrained(tmp_path)
  config, params, extra = import_bert(tmp_path)
  assert bert_prefix(read_state_dict(tmp_path)) == "bert."
  assert config.add_pooling_layer
  assert sorted(extra) == ["classifier.bias", "classifier.weight"]
  assert np.array_equal(extra["classifier.weight"], model.classifier.weight.detach().numpy())
  assert np.abs(np.asarray(_flax_outputs(params)[0]) - _torch_hidden(model.bert)).max() <= 1e-5


def test_masked_lm_checkpoint_drops_head_and_has_no_pooler(tmp_path, caplog):
  model = _randomize(transformers.BertForMaskedLM(_hf_config()))
  model.save_pretrained(tmp_path)
  with caplog.at_level(logging.WARNING):
    config, params, extra = import_bert(tmp_path)
  assert "masked-LM head" in caplog.text
  assert extra == {} and not config.add_pooling_layer and "pooler" not in params
  hidden, pooled = _flax_outputs(params, config)
  assert pooled is None
  assert np.abs(np.asarray(hidden) - _torch_hidden(model.bert)).max() <= 1e-5


def test_legacy_layer_norm_names_import():
  state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                    "LayerNorm.beta"): v
           for k, v in flax_to_hf(_flax_params(), SMALL).items()}
  assert any(k.endswith("gamma") for k in state)
  params, unplaced = hf_to_flax(state, SMALL)
  assert unplaced == []
  want = _flax_params()["encoder"]["layer_1"]["output"]["LayerNorm"]
  assert np.array_equal(params["encoder"]["layer_1"]["output"]["LayerNorm"]["scale"], want["scale"])
  assert np.array_equal(params["encoder"]["layer_1"]["output"]["LayerNorm"]["bias"], want["bias"])


def test_hf_to_flax_errors_name_missing_and_misshapen_keys():
  state = {k: v.numpy() for k, v in transformers.BertModel(_hf_config()).state_dict().items()}
  del state["encoder.layer.1.attention.self.key.bias"]
  state["pooler.dense.weight"] = np.zeros((3, 32), np.float32)
  state["unrelated.weight"] = np.zeros(2, np.float32)
  with pytest.raises(ValueError) as error:
    hf_to_flax(state, SMALL)
  assert "missing encoder.layer.1.attention.self.key.bias" in str(error.value)
  assert "pooler.dense.weight: expected shape (32, 32), found (3, 32)" in str(error.value)
  state["encoder.layer.1.attention.self.key.bias"] = np.zeros(32, np.float32)
  state["pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  assert hf_to_flax(state, SMALL)[1] == ["unrelated.weight"]  # buffers are not reported


def test_flax_to_hf_rejects_unknown_parameters():
  params = _flax_params()
  params["encoder"]["layer_7"] = params["encoder"]["layer_0"]
  with pytest.raises(ValueError, match="no HF name for parameter encoder/layer_7/"):
    flax_to_hf(params, SMALL)


def test_bert_prefix():
  assert bert_prefix(["embeddings.word_embeddings.weight", "pooler.dense.bias"]) == ""
  assert bert_prefix(["bert.embeddings.word_embeddings.weight", "linear.weight"]) == "bert."
  with pytest.raises(ValueError, match="no BERT"):
    bert_prefix(["shared.weight", "xembeddings.word_embeddings.weight"])
  with pytest.raises(ValueError, match="several BERTs"):
    bert_prefix(["q.embeddings.word_embeddings.weight", "p.embeddings.word_embeddings.weight"])


def _colbert_dir(path, extra_tensors=None):
  """A stanford-ColBERT (HF_ColBERT) style checkpoint directory."""
  bert = _randomize(transformers.BertModel(_hf_config()))
  linear = _randomize(torch.nn.Linear(SMALL.hidden_size, 8, bias=False), seed=1)
  state = {f"bert.{k}": v for k, v in bert.state_dict().items()}
  state |= {"linear.weight": linear.weight.detach(), **(extra_tensors or {})}
  path.mkdir()
  safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()},
                              path / "model.safetensors", metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps(_hf_config(architectures=["HF_ColBERT"]).to_dict()))
  metadata = {"dim": 8, "doc_maxlen": 180, "query_maxlen": 32}
  (path / "artifact.metadata").write_text(json.dumps(metadata))
  return bert, linear, metadata


def test_import_colbert(tmp_path):
  bert, linear, metadata = _colbert_dir(tmp_path / "colbert")
  config, params, got_metadata = import_colbert(tmp_path / "colbert")
  assert config == SMALL and got_metadata == metadata
  assert np.array_equal(params["linear"]["kernel"], linear.weight.detach().numpy().T)
  assert np.abs(np.asarray(_flax_outputs(params["bert"])[0]) - _torch_hidden(bert)).max() <= 1e-5


def test_import_colbert_rejects_unknown_keys(tmp_path):
  _colbert_dir(tmp_path / "colbert", {"linear.bias": torch.zeros(8), "mystery": torch.ones(2)})
  with pytest.raises(ValueError, match=r"\['linear.bias', 'mystery'\]"):
    import_colbert(tmp_path / "colbert")


def test_missing_weights_error_names_the_directory(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(SMALL.to_hf_dict()))
  looked_for = re.escape(str(tmp_path)) + ".*model.safetensors.*pytorch_model.bin"
  with pytest.raises(FileNotFoundError, match=looked_for):
    import_colbert(tmp_path)
