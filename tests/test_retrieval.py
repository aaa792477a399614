"""Retrieval: FAISS and MaxSim search against float64 numpy, ColBERTv1 recall, resumable corpus encoding in
float32 or float16, and encoders imported from exported / sentence-transformers directories with the lengths
they record."""

import json
import logging

import jax
import numpy as np
import pytest
import sentence_transformers

from pairdistill_jax import io
from pairdistill_jax.convert import hf_io
from pairdistill_jax.retrieval import corpus, devices, encoders, search
from pairdistill_jax.students import colbert, dpr

import data_helpers
from test_export import TEXTS, random_student


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_maxsim_top_k(q_QxLxD, vectors_TxD, lengths_N, k):
  """float64 reference: every document's MaxSim, then the k best (ties by lower index)."""
  starts = np.cumsum(lengths_N) - lengths_N
  q = q_QxLxD.astype(np.float64)
  scores_QxN = np.stack([(q @ vectors_TxD[s:s + n].astype(np.float64).T).max(-1).sum(-1)
                         for s, n in zip(starts, lengths_N)], axis=1)
  order = np.argsort(-scores_QxN, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores_QxN, order, axis=1), order


def token_store(vectors_TxD, lengths_N, chunk_size):
  """A store of `chunk_size` documents per chunk, as corpus encoding writes them."""
  last_docs = np.minimum(np.arange(chunk_size, len(lengths_N) + chunk_size, chunk_size), len(lengths_N)) - 1
  ends = np.cumsum(lengths_N)[last_docs]
  starts = np.concatenate([[0], ends[:-1]])
  return corpus.EmbeddingStore([vectors_TxD[a:b] for a, b in zip(starts, ends)], lengths_N, chunk_size)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_flat_search_equals_exact_numpy_top_k(dtype):
  rng = np.random.default_rng(0)
  docs = rng.normal(size=(500, 16)).astype(dtype)
  queries = rng.normal(size=(20, 16)).astype(np.float32)
  store = corpus.DenseStore([docs[:300], docs[300:]])
  scores, ids = search.search(queries, store, 10, search.SearchOptions(index="auto"))
  exact = queries.astype(np.float64) @ docs.astype(np.float64).T
  expected = np.argsort(-exact, axis=1)[:, :10]
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dpr_ivfpq_finds_the_source_of_noisy_copies(dtype):
  rng = np.random.default_rng(1)
  docs = unit(rng.normal(size=(4000, 32))).astype(dtype)
  targets = rng.choice(4000, 50, replace=False)
  queries = unit(docs[targets] + 0.05 * rng.normal(size=(50, 32))).astype(np.float32)
  options = search.SearchOptions(index="ivfpq", nprobe=16)
  _, ids = search.search(queries, corpus.DenseStore([docs]), 10, options)
  assert (ids[:, 0] == targets).mean() >= 0.9


def test_exact_maxsim_matches_float64_numpy_across_chunks_and_devices():
  rng = np.random.default_rng(2)
  lengths = rng.integers(1, 13, size=37)
  vectors = unit(rng.normal(size=(lengths.sum(), 8))).astype(np.float16)
  queries = unit(rng.normal(size=(5, 4, 8))).astype(np.float32)
  store = token_store(vectors, lengths, chunk_size=10)
  assert len(store.chunks) == 4
  scores, ids = search.maxsim_exact(queries, store, 7, devices.local_mesh())
  expected_scores, expected_ids = np_maxsim_top_k(queries, vectors, lengths, 7)
  np.testing.assert_array_equal(ids, expected_ids)
  np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)


def test_exact_maxsim_multiplies_in_float32_on_every_platform():
  """JAX's default lets GPUs multiply float32 in TF32 and TPUs in bfloat16; exact search must not."""
  q, d, mask = np.ones((2, 3, 4), np.float32), np.ones((5, 6, 4), np.float16), np.ones((5, 6), np.int32)
  jaxpr = jax.make_jaxpr(search.maxsim_float32)(q, d, mask)
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  assert len(dots) == 1 and dots[0].params["precision"] == (jax.lax.Precision.HIGHEST,) * 2
  assert all(v.aval.dtype == np.float32 for v in dots[0].invars)


def grouped_colbert_corpus(rng, groups=60, per_group=10, dim=32):
  """Groups of documents sharing a 'vocabulary' of token directions (plus common background tokens); a query
  drawn from one group's vocabulary has that group's documents as its MaxSim top 10."""
  vocabularies = unit(rng.normal(size=(groups, 8, dim)))
  background = unit(rng.normal(size=(200, dim)))
  lengths = rng.integers(12, 40, size=groups * per_group)
  docs = []
  for doc, n in enumerate(lengths):
    own = rng.random(n)[:, None] < 0.7
    centres = np.where(own, vocabularies[doc // per_group][rng.integers(0, 8, n)], background[rng.integers(0, 200, n)])
    docs.append(unit(centres + 0.06 * rng.normal(size=(n, dim))))
  query_groups = rng.choice(groups, 30, replace=False)
  queries = unit(vocabularies[query_groups][:, rng.integers(0, 8, 16)] + 0.06 * rng.normal(size=(30, 16, dim)))
  return np.concatenate(docs).astype(np.float16), lengths, queries.astype(np.float32), query_groups


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_colbert_v1_ivfpq_recovers_exact_maxsim_top10(dtype):
  vectors, lengths, queries, query_groups = grouped_colbert_corpus(np.random.default_rng(3))
  store = token_store(vectors.astype(dtype), lengths, chunk_size=256)
  mesh = devices.local_mesh()
  _, exact_ids = search.maxsim_exact(queries, store, 10, mesh)
  assert np.mean(exact_ids // 10 == query_groups[:, None]) > 0.9  # the corpus is what it claims to be
  options = search.SearchOptions(index="ivfpq", nlist=64, nprobe=8, faiss_depth=16)
  scores, ids = search.search(queries, store, 10, options, mesh)
  recovered = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
  assert recovered >= 0.95
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_auto_index_picks_exact_for_small_colbert_and_flat_for_dpr():
  store = data_helpers.token_store(np.zeros((10, 4), np.float16), np.array([4, 6]))
  assert search.SearchOptions().resolve(store) == "exact"
  assert search.SearchOptions(exact_max_tokens=9).resolve(store) == "ivfpq"
  assert search.SearchOptions().resolve(corpus.DenseStore([np.zeros((3, 4), np.float32)])) == "flat"
  with pytest.raises(ValueError, match="index 'flat' does not apply to a EmbeddingStore"):
    search.SearchOptions(index="flat").resolve(store)


def corpus_texts(n=30):
  rng = np.random.default_rng(4)
  words = " ".join(TEXTS).replace(",", " ,").split()
  return [" ".join(rng.choice(words, rng.integers(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def colbert_encoder(tmp_path_factory):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path_factory.mktemp("colbert"), "colbert")
  return encoders.from_params(config.model, bert_config, params, tokenizer_dir)


def test_colbert_corpus_store_holds_each_documents_scored_tokens(colbert_encoder, tmp_path):
  texts = corpus_texts()
  store = corpus.encode_corpus(colbert_encoder, texts, tmp_path, batch_size=8, chunk_size=8)
  assert isinstance(store, corpus.EmbeddingStore) and len(store.chunks) == 4
  tokens = colbert_encoder.tokenizer.encode_docs(texts)
  for i in (0, 9, 29):  # one at a time, full width, no sorting or bucketing
    alone = colbert_encoder.encode("doc", tokens["ids"][i:i + 1], tokens["mask"][i:i + 1])[0]
    expected = alone[tokens["score_mask"][i].astype(bool)]
    got, mask = store.gather(np.array([i]), store.max_length)
    np.testing.assert_allclose(got[0][mask[0].astype(bool)], expected, atol=1e-5)  # float32: no rounding
    assert store.lengths[i] == tokens["score_mask"][i].sum()


def test_corpus_vectors_are_float32_unless_float16_is_asked_and_another_dtype_is_refused_unless_rebuilt(
    colbert_encoder, tmp_path, caplog):
  texts = corpus_texts()
  exact = corpus.encode_corpus(colbert_encoder, texts, tmp_path / "f32", batch_size=8, chunk_size=8)
  assert {c.dtype for c in exact.chunks} == {np.dtype(np.float32)}
  assert json.loads((tmp_path / "f32" / io.MANIFEST).read_text())["vector_dtype"] == "float32"
  with pytest.raises(ValueError, match=r"other settings \(differing: vector_dtype\); delete it to start over"):
    corpus.encode_corpus(colbert_encoder, texts, tmp_path / "f32", batch_size=8, chunk_size=8, vector_dtype="float16")
  with caplog.at_level(logging.INFO):
    half = corpus.encode_corpus(colbert_encoder, texts, tmp_path / "f32", batch_size=8, chunk_size=8,
                                vector_dtype="float16", rebuild=True)
  assert "Rebuilding" in caplog.text and "(differing: vector_dtype)" in caplog.text
  assert {c.dtype for c in half.chunks} == {np.dtype(np.float16)}
  np.testing.assert_allclose(np.concatenate(half.chunks), np.concatenate(exact.chunks), atol=1e-3)
  with pytest.raises(ValueError, match="vector_dtype must be one of"):
    corpus.encode_corpus(colbert_encoder, texts, tmp_path / "f32", vector_dtype="bfloat16")


def test_exact_search_of_a_float32_store_equals_float64_maxsim_of_the_encoders_vectors(colbert_encoder, tmp_path):
  """The reference scores the documents encoded one at a time, in float64 (a float16 store is ~1e-3 off)."""
  texts = corpus_texts()
  store = corpus.encode_corpus(colbert_encoder, texts, tmp_path, batch_size=8, chunk_size=8)
  queries = colbert_encoder.encode_queries(TEXTS, 8)
  scores, ids = search.search(queries, store, 10, mesh=colbert_encoder.mesh)
  tokens = colbert_encoder.tokenizer.encode_docs(texts)
  docs = [colbert_encoder.encode("doc", tokens["ids"][i:i + 1], tokens["mask"][i:i + 1])[0] for i in range(len(texts))]
  q = queries.astype(np.float64)
  expected_QxN = np.stack([(q @ d[keep.astype(bool)].astype(np.float64).T).max(-1).sum(-1)
                           for d, keep in zip(docs, tokens["score_mask"])], axis=1)
  np.testing.assert_allclose(scores, np.take_along_axis(expected_QxN, ids, axis=1), rtol=1e-6)
  np.testing.assert_allclose(scores, -np.sort(-expected_QxN, axis=1)[:, :10], rtol=1e-6)  # the best 10, up to ties


def test_dpr_corpus_vectors_equal_one_at_a_time_encoding(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "dpr")
  encoder = encoders.from_params(config.model, bert_config, params, tokenizer_dir)
  texts = corpus_texts(12)
  store = corpus.encode_corpus(encoder, texts, tmp_path / "emb", batch_size=8, chunk_size=5)
  assert isinstance(store, corpus.DenseStore) and [len(c) for c in store.chunks] == [5, 5, 2]
  tokens = encoder.tokenizer.encode_docs(texts)
  alone = np.concatenate([encoder.encode("doc", tokens["ids"][i:i + 1], tokens["mask"][i:i + 1])
                          for i in range(len(texts))])
  np.testing.assert_allclose(np.concatenate(store.chunks), alone, atol=1e-5)


def test_encoder_from_exported_stanford_dir_equals_the_trained_encoder(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert", seed=3)
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  out = colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings, pylate=False)
  imported = encoders.from_model_dir(out / "colbert")
  trained = encoders.from_params(config.model, bert_config, params, tokenizer_dir)
  assert imported.kind == "colbert" and (imported.tokenizer.query_maxlen, imported.tokenizer.doc_maxlen) == (16, 48)
  assert imported.settings() == trained.settings()
  np.testing.assert_allclose(imported.encode_queries(TEXTS, 8), trained.encode_queries(TEXTS, 8), atol=1e-6)


def test_stanford_dir_without_metadata_says_it_uses_stanford_defaults(tmp_path, caplog):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "colbert")
  settings = colbert.ColBERTSettings.from_model_config(config.model)
  out = colbert.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings, pylate=False)
  (out / "colbert" / "artifact.metadata").unlink()
  with caplog.at_level(logging.INFO, logger=encoders.__name__):
    imported = encoders.from_model_dir(out / "colbert", doc_maxlen=40)
  assert (imported.tokenizer.query_maxlen, imported.tokenizer.doc_maxlen) == (32, 40)
  assert "records no query/document lengths: using stanford ColBERT's defaults" in caplog.text
  assert "query length 32 (stanford ColBERT's defaults), document length 40 (set in the config)" in caplog.text


@pytest.mark.parametrize("directory, pooling", [(dpr.QUERY_ST_DIR, None), (dpr.PASSAGE_ST_DIR, None),
                                                (dpr.DPR_QUESTION_DIR, "cls"), (dpr.DPR_CONTEXT_DIR, "cls")])
def test_exported_dpr_dirs_give_back_the_trained_lengths(tmp_path, directory, pooling):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "dpr", pooling="cls")
  out = dpr.export_dpr(tmp_path / "export", bert_config, params, tokenizer_dir, pooling="cls",
                          query_maxlen=20, doc_maxlen=72)
  imported = encoders.from_model_dir(out / directory, pooling=pooling)
  assert (imported.tokenizer.query_maxlen, imported.tokenizer.doc_maxlen) == (20, 72)
  assert imported.module.pooling == "cls"
  overridden = encoders.from_model_dir(out / directory, pooling=pooling, query_maxlen=12)
  assert (overridden.tokenizer.query_maxlen, overridden.tokenizer.doc_maxlen) == (12, 72)


def test_query_encoding_shows_progress_beyond_one_batch(colbert_encoder, capsys):
  colbert_encoder.encode_queries(TEXTS, 8)
  assert "encode queries" not in capsys.readouterr().err
  colbert_encoder.encode_queries(TEXTS * 5, 8)
  assert "encode queries" in capsys.readouterr().err


def test_encoder_from_sentence_transformers_dir_equals_sentence_transformers(minilm_dir, caplog):
  with caplog.at_level(logging.INFO, logger=encoders.__name__):
    encoder = encoders.from_model_dir(minilm_dir)
  assert (encoder.kind, encoder.module.pooling, encoder.normalize) == ("dpr", "mean", True)
  assert (encoder.tokenizer.query_maxlen, encoder.tokenizer.doc_maxlen) == (256, 256)
  assert "records no query/document lengths: using max_seq_length of" in caplog.text
  expected = sentence_transformers.SentenceTransformer(str(minilm_dir), device="cpu").encode(TEXTS)
  tokens = encoder.tokenizer.encode_docs(TEXTS)
  np.testing.assert_allclose(encoder.encode("doc", tokens["ids"], tokens["mask"]), expected, atol=1e-5)
  np.testing.assert_allclose(encoder.encode_queries(TEXTS, batch_size=3), expected, atol=1e-5)  # cut widths


def test_hf_dir_without_pooling_config_needs_the_pooling_flag(tmp_path):
  config, bert_config, params, tokenizer_dir = random_student(tmp_path, "dpr")
  hf_io.export_bert(tmp_path / "bert", bert_config, params["query_encoder"], tokenizer_dir=tokenizer_dir)
  with pytest.raises(ValueError, match="--pooling=cls or --pooling=mean"):
    encoders.from_model_dir(tmp_path / "bert")
  assert encoders.from_model_dir(tmp_path / "bert", pooling="cls").module.pooling == "cls"
