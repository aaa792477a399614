"""Export to PyTorch: the written directories load in `transformers` / sentence-transformers (strictly) and
give the JAX embeddings; stanford / PyLate metadata; atomic writes."""

import json
import os
import pathlib
import subprocess

import jax
import numpy as np
import pytest
import safetensors
import safetensors.torch
import sentence_transformers
import torch
import transformers
from flax import traverse_util

import configs.colbert
import configs.dpr
from pairdistill_jax.convert import hf_io
from pairdistill_jax.data import demo
from pairdistill_jax.data.tokenization import ColBERTTokenizer, DPRTokenizer, load_tokenizer
from pairdistill_jax.models.bert import BertConfig
from pairdistill_jax.students import colbert, dpr, make_student

WORDS = ("apple banana cherry delta echo falcon garden harbor island jungle kettle lemon mango nectar ocean "
         "pepper quartz river salmon tiger umbrella violet walnut xenon yellow zebra").split()
TEXTS = ["apple banana, cherry.", "delta echo falcon garden harbor island jungle kettle lemon mango!",
         "ocean", "pepper quartz river salmon tiger umbrella violet walnut xenon yellow zebra apple banana"]


def random_student(tmp_path: pathlib.Path, kind: str, seed: int = 0, tokenizer_dir: pathlib.Path | None = None,
                   **model_overrides):
  """(config, bert_config, params, tokenizer_dir): the demo config's student with every weight random."""
  config = (configs.colbert if kind == "colbert" else configs.dpr).get_config("demo")
  config.model.update(model_overrides)
  if tokenizer_dir is None:
    tokenizer_dir = tmp_path / f"tokenizer_{kind}"
    demo.write_tokenizer(tokenizer_dir, list(WORDS))
  bert_config = BertConfig(**{**config.model.bert, "vocab_size": len(load_tokenizer(tokenizer_dir))})
  model = make_student(config.model, bert_config)
  ids = np.ones((1, 8), np.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids, ids)["params"]
  flat = traverse_util.flatten_dict(jax.tree.map(lambda x: x.value, shapes, is_leaf=lambda x: hasattr(x, "names")))
  rng = np.random.default_rng(seed)
  params = traverse_util.unflatten_dict({k: rng.normal(0, 0.2, v.shape).astype(np.float32) for k, v in flat.items()})
  return config, bert_config, params, tokenizer_dir


def jax_encode(config, bert_config, params, which: str, tokens: dict) -> np.ndarray:
  model = make_student(config.model, bert_config)
  method = model.encode_query if which == "query" else model.encode_doc
  return np.asarray(model.apply({"params": params}, tokens["ids"], tokens["mask"], method=method))


def colbert_tokens(config, tokenizer_dir):
  m = config.model
  tok = ColBERTTokenizer(load_tokenizer(tokenizer_dir), query_maxlen=m.query_maxlen, doc_maxlen=m.doc_maxlen)
  return tok.encode_queries(TEXTS), tok.encode_docs(TEXTS)


class TorchColBERT(torch.nn.Module):
  """stanford HF_ColBERT's parameters: `bert` (BertModel) and `linear` (no bias); vectors L2-normalised."""

  def __init__(self, config: transformers.BertConfig, dim: int):
    super().__init__()
    self.bert = transformers.BertModel(config)
    self.linear = torch.nn.Linear(config.hidden_size, dim, bias=False)

  def forward(self, ids, mask):
    hidden = self.bert(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())[0]
    return torch.nn.functional.normalize(self.linear(hidden), dim=-1)


def load_strict(module: torch.nn.Module, path: pathlib.Path) -> None:
  """Loads a safetensors file whose keys are exactly the module's parameters (buffers aside)."""
  state = safetensors.torch.load_file(path)
  assert set(state) == {name for name, _ in module.named_parameters()}
  missing, unexpected = module.load_state_dict(state, strict=False)
  assert unexpected == [] and all(k.endswith(("position_ids", "token_type_ids")) for k in missing)


def test_colbert_stanford_export_loads_in_transformers_with_equal_embeddings(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert")
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  out = colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings) / "colbert"

  hf_config = transformers.BertConfig.from_pretrained(out)
  assert hf_config.architectures == ["HF_ColBERT"]
  with safetensors.safe_open(out / "model.safetensors", "pt") as f:
    assert f.metadata() == {"format": "pt"}
  torch_model = TorchColBERT(hf_config, config.model.dim).eval()
  load_strict(torch_model, out / "model.safetensors")
  queries, docs = colbert_tokens(config, tokenizer_dir)
  with torch.no_grad():
    for which, tokens in (("query", queries), ("doc", docs)):
      expected = jax_encode(config, bert_config, params, which, tokens)
      got = torch_model(tokens["ids"], tokens["mask"]).numpy()
      assert np.abs(got - expected).max() <= 1e-5, which

  metadata = json.loads((out / "artifact.metadata").read_text())
  assert metadata == {"dim": 32, "query_maxlen": 16, "doc_maxlen": 48, "mask_punctuation": True,
                      "attend_to_mask_tokens": False, "query_token_id": "[unused0]", "doc_token_id": "[unused1]",
                      "query_token": "[Q]", "doc_token": "[D]", "similarity": "cosine", "interaction": "colbert"}
  assert (out / "vocab.txt").read_text() == (tokenizer_dir / "vocab.txt").read_text()
  _, back, _ = hf_io.import_colbert(out)
  np.testing.assert_array_equal(back["linear"]["kernel"], params["linear"]["kernel"])


def test_pylate_export_has_native_layout_and_equal_embeddings(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert", seed=1)
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  out = colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings) / "pylate"

  modules = json.loads((out / "modules.json").read_text())
  assert [(m["path"], m["type"]) for m in modules] == [("", "sentence_transformers.models.Transformer"),
                                                       ("1_Dense", "pylate.models.Dense.Dense")]
  st_config = json.loads((out / "config_sentence_transformers.json").read_text())
  assert (st_config["query_prefix"], st_config["document_prefix"]) == ("[unused0]", "[unused1]")
  assert (st_config["query_length"], st_config["document_length"]) == (16, 48)
  assert st_config["attend_to_expansion_tokens"] is False and st_config["do_query_expansion"] is True
  assert set(st_config["skiplist_words"]) == set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
  dense = json.loads((out / "1_Dense" / "config.json").read_text())
  assert dense == {"in_features": 64, "out_features": 32, "bias": False,
                   "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False}

  bert = transformers.BertModel.from_pretrained(out).eval()
  dense_module = torch.nn.ModuleDict({"linear": torch.nn.Linear(64, 32, bias=False)})  # ST Dense's names
  load_strict(dense_module, out / "1_Dense" / "model.safetensors")
  _, docs = colbert_tokens(config, tokenizer_dir)
  with torch.no_grad():
    hidden = bert(input_ids=torch.from_numpy(docs["ids"]).long(),
                  attention_mask=torch.from_numpy(docs["mask"]).long())[0]
    got = torch.nn.functional.normalize(dense_module["linear"](hidden), dim=-1).numpy()
  assert np.abs(got - jax_encode(config, bert_config, params, "doc", docs)).max() <= 1e-5


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", False), ("mean", True)])
def test_dpr_sentence_transformers_export_gives_the_jax_embeddings(tmp_path, pooling, normalize):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "dpr", pooling=pooling, normalize=normalize)
  m = config.model
  out = dpr.export_dpr(tmp_path / "export", bert_config, params, tokenizer_dir, pooling=pooling,
                          query_maxlen=m.query_maxlen, doc_maxlen=m.doc_maxlen, normalize=normalize)
  tok = DPRTokenizer(load_tokenizer(tokenizer_dir), query_maxlen=m.query_maxlen, doc_maxlen=m.doc_maxlen)
  for directory, which, tokens in ((dpr.QUERY_ST_DIR, "query", tok.encode_queries(TEXTS)),
                                   (dpr.PASSAGE_ST_DIR, "doc", tok.encode_docs(TEXTS))):
    model = sentence_transformers.SentenceTransformer(str(out / directory), device="cpu")
    assert model.similarity_fn_name == ("cosine" if normalize else "dot")
    assert model.max_seq_length == (m.query_maxlen if which == "query" else m.doc_maxlen)
    st_config = json.loads((out / directory / "config_sentence_transformers.json").read_text())
    assert (st_config["query_length"], st_config["document_length"]) == (m.query_maxlen, m.doc_maxlen)
    got = model.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    expected = jax_encode(config, bert_config, params, which, tokens)
    assert np.abs(got - expected).max() <= 1e-5
    if normalize:  # the student's own vectors are unit vectors, and the export ends in a Normalize module
      np.testing.assert_allclose(np.linalg.norm(expected, axis=-1), 1.0, atol=1e-5)
  assert (out / dpr.DPR_QUESTION_DIR).exists() == (pooling == "cls" and not normalize)


def test_dpr_transformers_encoders_give_the_cls_vectors(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "dpr", pooling="cls")
  m = config.model
  out = dpr.export_dpr(tmp_path / "export", bert_config, params, tokenizer_dir, pooling="cls",
                          query_maxlen=m.query_maxlen, doc_maxlen=m.doc_maxlen)
  tok = DPRTokenizer(load_tokenizer(tokenizer_dir), query_maxlen=m.query_maxlen, doc_maxlen=m.doc_maxlen)
  tokens = tok.encode_docs(TEXTS)
  for directory, cls, which in ((dpr.DPR_QUESTION_DIR, transformers.DPRQuestionEncoder, "query"),
                                (dpr.DPR_CONTEXT_DIR, transformers.DPRContextEncoder, "doc")):
    dpr_config = transformers.DPRConfig.from_pretrained(out / directory)
    assert (dpr_config.query_length, dpr_config.document_length) == (m.query_maxlen, m.doc_maxlen)
    model = cls(dpr_config).eval()
    load_strict(model, out / directory / "model.safetensors")
    with torch.no_grad():
      got = model(input_ids=torch.from_numpy(tokens["ids"]).long(),
                  attention_mask=torch.from_numpy(tokens["mask"]).long()).pooler_output.numpy()
    assert np.abs(got - jax_encode(config, bert_config, params, which, tokens)).max() <= 1e-5
  query_weights = safetensors.torch.load_file(out / dpr.DPR_QUESTION_DIR / "model.safetensors")
  passage_weights = safetensors.torch.load_file(out / dpr.DPR_CONTEXT_DIR / "model.safetensors")
  key = "embeddings.word_embeddings.weight"
  assert not torch.equal(query_weights[f"question_encoder.bert_model.{key}"],
                         passage_weights[f"ctx_encoder.bert_model.{key}"])  # the two towers, not one twice


def test_shared_tower_dpr_exports_one_encoder_for_both_roles(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "dpr", shared_towers=True)
  assert set(params) == {"encoder"}
  out = dpr.export_dpr(tmp_path / "export", bert_config, params, tokenizer_dir, pooling="mean",
                          query_maxlen=16, doc_maxlen=48)
  query = safetensors.torch.load_file(out / dpr.QUERY_ST_DIR / "model.safetensors")
  passage = safetensors.torch.load_file(out / dpr.PASSAGE_ST_DIR / "model.safetensors")
  assert all(torch.equal(query[k], passage[k]) for k in query)


def test_failed_export_leaves_the_previous_one_and_no_temporary_files(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert")
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  target = tmp_path / "export"
  colbert.export_colbert(target, bert_config, params, tokenizer_dir, settings)
  before = (target / "colbert" / "model.safetensors").read_bytes()
  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no tokenizer files"):
    colbert.export_colbert(target, bert_config, params, empty, settings)
  assert (target / "colbert" / "model.safetensors").read_bytes() == before
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", "no_tokenizer", tokenizer_dir.name])


def test_wrong_projection_shape_is_reported(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert")
  settings = colbert.ColBERTSettings(dim=16)
  with pytest.raises(ValueError, match=r"linear kernel has shape \(64, 32\), expected \(64, 16\)"):
    colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings)


PYLATE_LOAD = """
import json, sys, numpy as np
from pylate import models
model = models.ColBERT(model_name_or_path=sys.argv[1], device="cpu")
texts = json.loads(sys.argv[2])
queries = np.stack(model.encode(texts, is_query=True, convert_to_numpy=True))
docs = model.encode(texts, is_query=False, convert_to_numpy=True)
np.savez(sys.argv[3], queries=queries, docs=np.concatenate(docs), doclens=[len(d) for d in docs])
"""
COLBERT_AI_LOAD = """
import json, sys, numpy as np, torch
from colbert.infra import ColBERTConfig
from colbert.modeling.checkpoint import Checkpoint
texts = json.loads(sys.argv[2])
checkpoint = Checkpoint(sys.argv[1], colbert_config=ColBERTConfig.load_from_checkpoint(sys.argv[1]))
with torch.no_grad():
  queries = checkpoint.queryFromText(texts).float().numpy()
  docs, doclens = checkpoint.docFromText(texts, bsize=len(texts), keep_dims="flatten")
np.savez(sys.argv[3], queries=queries, docs=docs.float().numpy(), doclens=doclens)
"""


@pytest.mark.slow
@pytest.mark.parametrize("library, variable, loader, directories", [
    ("PyLate", "PYLATE_PYTHON", PYLATE_LOAD, (colbert.COLBERT_DIR, colbert.PYLATE_DIR)),
    ("colbert-ai", "COLBERT_AI_PYTHON", COLBERT_AI_LOAD, (colbert.COLBERT_DIR,)),
])
def test_colbert_libraries_load_the_export_with_equal_embeddings(tmp_path, library, variable, loader,
                                                                 directories):
  """PyLate / stanford colbert-ai pin other transformers versions: they run in their own environment (the
  Makefile's check-colbert-libs target builds both and sets the variables)."""
  if not os.environ.get(variable):
    pytest.skip(f"set {variable} to a python that has {library} installed (make check-colbert-libs)")
  python = os.path.abspath(os.environ[variable])
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert", seed=5)
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  out = colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings)
  queries, docs = colbert_tokens(config, tokenizer_dir)
  expected_queries = jax_encode(config, bert_config, params, "query", queries)
  doc_vectors = jax_encode(config, bert_config, params, "doc", docs)
  keep = docs["score_mask"].astype(bool)
  for directory in directories:
    result = tmp_path / f"{directory}.npz"
    run = subprocess.run([python, "-c", loader, str(out / directory), json.dumps(TEXTS), str(result)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = np.load(result)
    assert np.abs(loaded["queries"] - expected_queries).max() <= 1e-5, directory
    assert loaded["doclens"].tolist() == keep.sum(1).tolist(), directory
    assert np.abs(loaded["docs"] - doc_vectors[keep]).max() <= 1e-5, directory
