"""CrossEncoder + import_cross_encoder vs PyTorch `transformers.BertForSequenceClassification`."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from sentence_transformers import CrossEncoder as STCrossEncoder

from pairdistill_jax.convert.hf_io import import_cross_encoder
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.models.cross_encoder import CrossEncoder
from pairdistill_jax.teachers.inputs import cross_encoder_inputs

QUERIES = ["what is the capital of france?", "how do cross-encoders score passages", "why"]
PASSAGES = ["Paris is the capital and most populous city of France, on the Seine.",
            "A cross-encoder reads the query and the passage together and outputs a logit.",
            "Because the teacher sees both texts at once, its relevance estimates are sharper "
            "than those of a bi-encoder, which encodes them separately."]


def _hf_config(num_labels: int) -> transformers.BertConfig:
  """A small BERT over the real uncased WordPiece vocabulary."""
  return transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=37, max_position_embeddings=64, type_vocab_size=2, num_labels=num_labels)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Every parameter random (LayerNorm scales around 1), so swapped or dropped weights show."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if name.endswith("LayerNorm.weight") else 0.0))
  return model.eval()


def _saved_classifier(tmp_path, num_labels: int, seed: int = 0):
  model = transformers.BertForSequenceClassification._from_config(
      _hf_config(num_labels), attn_implementation="eager")
  model = _randomize(model, seed)
  model.save_pretrained(tmp_path)
  return model


@pytest.fixture(scope="module")
def batch(minilm_dir) -> dict[str, np.ndarray]:
  """A padded pair batch with real token types, from the MiniLM WordPiece tokenizer."""
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  encoded = tokenizer(QUERIES, PASSAGES, padding=True, truncation=True, max_length=40,
                      return_tensors="np")
  assert encoded["attention_mask"].min() == 0 and encoded["token_type_ids"].max() == 1
  return {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _torch_logits(model, batch) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


@functools.cache
def _apply_fn(config: BertConfig, num_labels: int, dtype=jnp.float32):
  model = CrossEncoder(config, num_labels, dtype=dtype)
  return jax.jit(lambda params, b: model.apply(
      {"params": params}, b["input_ids"], b["attention_mask"], b["token_type_ids"]))


@pytest.mark.parametrize("num_labels", [1, 2])
def test_logits_match_torch(tmp_path, batch, num_labels):
  model = _saved_classifier(tmp_path, num_labels, seed=num_labels)
  config, got_labels, params = import_cross_encoder(tmp_path)
  assert got_labels == num_labels
  logits = np.asarray(_apply_fn(config, num_labels)(params, batch))
  want = _torch_logits(model, batch)
  assert logits.shape == (len(QUERIES), num_labels) and logits.dtype == np.float32
  assert np.abs(logits - want).max() <= 1e-5
  assert np.abs(want).max() > 1e-2  # the logits are not trivially zero


def _pad(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Right-pads every field with 0 to the longest item."""
  width = max(len(item["input_ids"]) for item in items)
  return {field: np.stack([np.pad(item[field], (0, width - len(item[field]))) for item in items])
          for field in items[0]}


def test_pipeline_matches_sentence_transformers(tmp_path, minilm_dir):
  """cross_encoder_inputs -> padding -> CrossEncoder gives sentence-transformers' raw scores."""
  _saved_classifier(tmp_path, 1)
  tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  tokenizer.save_pretrained(tmp_path)
  reference = STCrossEncoder(str(tmp_path), local_files_only=True, max_length=24, device="cpu",
                             activation_fn=torch.nn.Identity())
  want = reference.predict(list(zip(QUERIES, PASSAGES)), show_progress_bar=False)
  config, num_labels, params = import_cross_encoder(tmp_path)
  batch = _pad(cross_encoder_inputs(tokenizer, QUERIES, PASSAGES, max_length=24))
  assert batch["input_ids"].shape[1] == 24
  logits = np.asarray(_apply_fn(config, num_labels)(params, batch))
  assert np.abs(logits[:, 0] - want).max() <= 1e-5


def test_bfloat16_is_close_to_float32(tmp_path, batch):
  model = _saved_classifier(tmp_path, 1)
  config, num_labels, params = import_cross_encoder(tmp_path)
  logits = np.asarray(_apply_fn(config, num_labels, jnp.bfloat16)(params, batch))
  want = _torch_logits(model, batch)
  assert logits.dtype == np.float32
  assert np.abs(logits - want).max() <= 0.02 * (1.0 + np.abs(want).max())


def test_dropout_is_active_in_training_mode(tmp_path, batch):
  _saved_classifier(tmp_path, 2)
  config, num_labels, params = import_cross_encoder(tmp_path)
  args = ({"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  model = CrossEncoder(config, num_labels)
  train = model.apply(*args, deterministic=False, rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(np.asarray(train), np.asarray(model.apply(*args)))


def test_plain_bert_model_is_refused(tmp_path):
  config = _hf_config(1)
  _randomize(transformers.BertModel(config), 0).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match="not a sequence-classification checkpoint"):
    import_cross_encoder(tmp_path)


def test_config_label_count_must_match_classifier(tmp_path):
  _saved_classifier(tmp_path, 1)
  config_path = tmp_path / "config.json"
  hf_config = json.loads(config_path.read_text())
  hf_config["id2label"] = {"0": "A", "1": "B", "2": "C"}
  config_path.write_text(json.dumps(hf_config))
  with pytest.raises(ValueError, match="declares"):
    import_cross_encoder(tmp_path)


def test_classifier_logical_axes():
  config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=20, max_position_embeddings=16)
  ids = jnp.ones((2, 5), jnp.int32)
  boxed = jax.eval_shape(CrossEncoder(config, 3).init, jax.random.key(0), ids, ids, ids)["params"]
  classifier = boxed["classifier"]
  assert classifier["kernel"].names == ("embed", None)
  assert classifier["bias"].names == (None,)
  assert nn.meta.unbox(classifier)["kernel"].shape == (16, 3)
  assert set(boxed) == {"bert", "classifier"}


def test_bert_without_pooler_is_refused():
  config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=20, max_position_embeddings=16, add_pooling_layer=False)
  ids = jnp.ones((2, 5), jnp.int32)
  with pytest.raises(ValueError, match="add_pooling_layer"):
    CrossEncoder(config, 1).init(jax.random.key(0), ids, ids, ids)
