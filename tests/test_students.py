"""ColBERT and DPR students vs PyTorch `transformers` + float64 numpy scoring; the built-in kinds against the
student protocol (students.registry)."""

import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from pairdistill_jax import students
from pairdistill_jax.convert.bert_table import hf_to_flax
from pairdistill_jax.data import demo
from pairdistill_jax.data.tokenization import load_tokenizer
from pairdistill_jax.models import scoring
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.students.colbert import ColBERT
from pairdistill_jax.students.dpr import DPR

HF_CONFIG = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)


def np_maxsim(q, d, mask):
  """float64 reference: s[b, m] = sum_i max_{j: mask[m, j]} <q_bi, d_mj>."""
  q, d = q.astype(np.float64), d.astype(np.float64)
  out = np.zeros((q.shape[0], d.shape[0]))
  for b in range(q.shape[0]):
    for m in range(d.shape[0]):
      valid = d[m][mask[m] > 0]
      out[b, m] = (q[b] @ valid.T).max(axis=1).sum()
  return out


def random_unit(rng, *shape):
  x = rng.normal(size=shape).astype(np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_maxsim_matches_float64_numpy():
  rng = np.random.default_rng(0)
  q, d = random_unit(rng, 3, 5, 8), random_unit(rng, 7, 6, 8)
  mask = (rng.random((7, 6)) < 0.6).astype(np.int32)
  mask[:, 0] = 1
  np.testing.assert_allclose(scoring.maxsim(q, d, mask), np_maxsim(q, d, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_size", [1, 2, 4])
def test_grouped_scores_and_own_block_match_loops(group_size):
  rng = np.random.default_rng(1)
  batch, nway = 4, 3
  q, d = random_unit(rng, batch, 5, 8), random_unit(rng, batch, nway, 6, 8)
  mask = (rng.random((batch, nway, 6)) < 0.7).astype(np.int32)
  mask[..., 0] = 1
  grouped = np.asarray(scoring.grouped_scores(scoring.maxsim, q, d, mask, group_size=group_size))
  assert grouped.shape == (batch, group_size * nway)
  for b in range(batch):
    first = (b // group_size) * group_size
    group_docs = d[first:first + group_size].reshape(-1, 6, 8)
    group_mask = mask[first:first + group_size].reshape(-1, 6)
    np.testing.assert_allclose(grouped[b], np_maxsim(q[b:b + 1], group_docs, group_mask)[0], rtol=1e-5)
  own = np.asarray(scoring.own_block(grouped, nway, group_size))
  expected = np.stack([np_maxsim(q[b:b + 1], d[b], mask[b])[0] for b in range(batch)])
  np.testing.assert_allclose(own, expected, rtol=1e-5)


def test_dot_scores_match_float64_numpy():
  rng = np.random.default_rng(2)
  q, d = rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=(3, 2, 16)).astype(np.float32)
  grouped = scoring.grouped_scores(scoring.dot, q, d, group_size=3)
  expected = q.astype(np.float64) @ d.reshape(-1, 16).astype(np.float64).T
  np.testing.assert_allclose(grouped, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def torch_bert():
  torch.manual_seed(0)
  return transformers.BertModel(transformers.BertConfig(**HF_CONFIG)).eval()


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(3)
  ids = rng.integers(5, 99, size=(3, 12)).astype(np.int32)
  mask = np.ones((3, 12), np.int32)
  mask[1, 8:] = 0
  mask[2, 5:] = 0
  return ids, mask


def _bert_params(torch_bert):
  state = {k: v.numpy() for k, v in torch_bert.state_dict().items()}
  params, unplaced = hf_to_flax(state, BertConfig.from_hf_dict(torch_bert.config.to_dict()))
  assert not unplaced
  return params


def test_colbert_encoder_matches_torch_bert_linear_normalize(torch_bert, inputs):
  ids, mask = inputs
  torch.manual_seed(1)
  linear = torch.nn.Linear(32, 8, bias=False)
  with torch.no_grad():
    hidden = torch_bert(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))[0]
    expected = torch.nn.functional.normalize(linear(hidden), p=2, dim=2).numpy()
  model = ColBERT(BertConfig.from_hf_dict(torch_bert.config.to_dict()), dim=8)
  params = {"bert": _bert_params(torch_bert), "linear": {"kernel": linear.weight.detach().numpy().T}}
  for method in ("encode_query", "encode_doc"):
    got = model.apply({"params": params}, ids, mask, method=method)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("shared", [False, True])
def test_dpr_towers_match_torch_pooling(torch_bert, inputs, pooling, shared):
  ids, mask = inputs
  with torch.no_grad():
    hidden = torch_bert(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask))[0].numpy()
  if pooling == "cls":
    expected = hidden[:, 0]
  else:
    expected = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  model = DPR(BertConfig.from_hf_dict(torch_bert.config.to_dict()), pooling=pooling, shared_towers=shared)
  bert = _bert_params(torch_bert)
  towers = ("encoder",) if shared else ("query_encoder", "passage_encoder")
  params = {tower: bert for tower in towers}
  variables = model.init(jax.random.PRNGKey(0), ids, mask, ids, mask)
  assert set(variables["params"]) == set(towers)
  for method in ("encode_query", "encode_doc"):
    np.testing.assert_allclose(model.apply({"params": params}, ids, mask, method=method), expected, atol=1e-5)


MODEL_FIELDS = {"colbert": dict(dim=8, mask_punctuation=True, attend_to_mask_tokens=False),
                "dpr": dict(pooling="cls", shared_towers=True, normalize=False)}


@pytest.mark.parametrize("kind", ["colbert", "dpr"])
def test_built_in_kinds_keep_the_protocol(tmp_path, kind):
  """Each kind's tokenizer is a StudentTokenizer, and its document vectors that count are, for ColBERT, the
  tokens of the hand-made score mask (punctuation and padding dropped); DPR has one vector per text."""
  demo.write_tokenizer(tmp_path, ["alpha", "beta"])
  student = students.get(kind)
  model_config = ml_collections.ConfigDict(dict(kind=kind, dtype="float32", remat="none", attention="auto",
                                                **MODEL_FIELDS[kind]))
  tokenizer = student.tokenizer(load_tokenizer(tmp_path), model_config, query_maxlen=6, doc_maxlen=7)
  assert isinstance(tokenizer, students.StudentTokenizer)
  tokens = tokenizer.encode_docs(["alpha , beta", "beta"])
  kept = student.doc_vector_mask(student.make_module(model_config, BertConfig(**HF_CONFIG)), tokens)
  if kind == "dpr":
    assert kept is None and not student.multi_vector
  else:  # [CLS] [D] alpha , beta [SEP] [PAD] / [CLS] [D] beta [SEP] [PAD] [PAD] [PAD]
    np.testing.assert_array_equal(kept, [[1, 1, 1, 0, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
