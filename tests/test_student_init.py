"""Initial student weights: init.layers cuts vs a cut PyTorch `transformers` model; model.bert fields that
apply (dropout) or would be ignored (shape) with pretrained weights."""

import numpy as np
import pytest
import torch
import transformers

from configs import colbert as colbert_config
from configs import dpr as dpr_config
from pairdistill_jax.config_lib import ConfigError
from pairdistill_jax.convert import students
from pairdistill_jax.students import make_student

TEXTS = ["Vitamin D deficiency raises the risk of fractures in older adults.", "What folds proteins?"]


def _dpr_config(minilm_dir, **init):
  config = dpr_config.get_config()
  config.model.update(pooling="mean", shared_towers=True, dtype="float32")
  config.init.update(pretrained=str(minilm_dir), **init)
  return config


@pytest.mark.parametrize("layers,kept", [("0,2,5", [0, 2, 5]), ("2", [0, 5]), ("3", [0, 2, 5]), ("1", [0])])
def test_cut_student_matches_the_cut_torch_model(minilm_dir, layers, kept):
  assert students.layer_indices(layers, 6) == kept
  config = _dpr_config(minilm_dir, layers=layers)
  bert_config, params = students.import_student(config, vocab_size=30522)
  assert bert_config.num_hidden_layers == len(kept)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
  batch = tokenizer(TEXTS, padding=True, return_tensors="np")
  got = make_student(config.model, bert_config).apply(
      {"params": params}, batch["input_ids"], batch["attention_mask"], method="encode_doc")

  torch_bert = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  torch_bert.encoder.layer = torch.nn.ModuleList([torch_bert.encoder.layer[i] for i in kept])
  with torch.no_grad():
    hidden = torch_bert(input_ids=torch.tensor(batch["input_ids"]),
                        attention_mask=torch.tensor(batch["attention_mask"]))[0].numpy()
  mask = batch["attention_mask"][..., None]
  np.testing.assert_allclose(got, (hidden * mask).sum(1) / mask.sum(1), atol=2e-5)


def test_layer_specs_that_cannot_work_are_refused():
  for spec, message in (("7", "has 6 layers"), ("0,6", "within"), ("3,1", "increasing"), ("a", "layer count")):
    with pytest.raises(ValueError, match=message):
      students.layer_indices(spec, 6)
  config = colbert_config.get_config("demo")
  config.init.layers = "2"
  with pytest.raises(ConfigError, match="random init"):
    students.import_student(config, vocab_size=100)


def test_dropout_applies_to_pretrained_weights(minilm_dir):
  config = _dpr_config(minilm_dir)
  config.model.bert.update(hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.0)
  bert_config, _ = students.import_student(config, vocab_size=30522)
  assert (bert_config.hidden_dropout_prob, bert_config.attention_probs_dropout_prob) == (0.25, 0.0)
  assert (bert_config.hidden_size, bert_config.num_hidden_layers) == (384, 6)  # the weights' shape wins


def test_shape_overrides_that_pretrained_weights_would_ignore_are_refused(minilm_dir):
  config = _dpr_config(minilm_dir)
  config.model.bert.num_hidden_layers = 4
  with pytest.raises(ConfigError, match=r"model.bert.num_hidden_layers=4 \(the initial weights have 6\).*"
                                        r"init.layers cuts layers"):
    students.import_student(config, vocab_size=30522)
  config.model.bert.num_hidden_layers = 6  # agrees with the weights: fine
  config.model.bert.hidden_size = 384
  students.import_student(config, vocab_size=30522)


def test_pooling_that_disagrees_with_the_sentence_transformers_config_is_refused(minilm_dir, caplog):
  config = _dpr_config(minilm_dir)
  config.model.pooling = "cls"  # MiniLM's 1_Pooling/config.json says mean
  with pytest.raises(ConfigError, match=r"model.pooling='cls' but .* pools with 'mean'.*model.pooling=mean"):
    students.import_student(config, vocab_size=30522)
  config.model.pooling = "mean"
  students.import_student(config, vocab_size=30522)
  assert "L2-normalises its vectors" in caplog.text  # its Normalize module: said, not silent
