"""Retrieval: FAISS and MaxSim search against float64 numpy, ColBERTv1 recall, resumable corpus encoding, and
encoders imported from exported / sentence-transformers directories."""

import numpy as np
import pytest
import sentence_transformers

from pairdistill_jax.convert import export, hf_io
from pairdistill_jax.retrieval import corpus, devices, encoders, search
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
  return corpus.TokenStore([vectors_TxD[a:b] for a, b in zip(starts, ends)], lengths_N, chunk_size)


def test_flat_search_equals_exact_numpy_top_k():
  rng = np.random.default_rng(0)
  docs = rng.normal(size=(500, 16)).astype(np.float32)
  queries = rng.normal(size=(20, 16)).astype(np.float32)
  store = corpus.DenseStore([docs[:300], docs[300:]])
  scores, ids = search.search(queries, store, 10, search.SearchOptions(index="auto"))
  exact = queries.astype(np.float64) @ docs.astype(np.float64).T
  expected = np.argsort(-exact, axis=1)[:, :10]
  np.testing.assert_array_equal(ids, expected)
  np.testing.assert_allclose(scores, np.take_along_axis(exact, expected, 1), rtol=1e-5, atol=1e-5)


def test_dpr_ivfpq_finds_the_source_of_noisy_copies():
  rng = np.random.default_rng(1)
  docs = unit(rng.normal(size=(4000, 32))).astype(np.float32)
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


def test_colbert_v1_ivfpq_recovers_exact_maxsim_top10():
  vectors, lengths, queries, query_groups = grouped_colbert_corpus(np.random.default_rng(3))
  store = token_store(vectors, lengths, chunk_size=256)
  mesh = devices.local_mesh()
  _, exact_ids = search.maxsim_exact(queries, store, 10, mesh)
  assert np.mean(exact_ids // 10 == query_groups[:, None]) > 0.9  # the corpus is what it claims to be
  options = search.SearchOptions(index="ivfpq", nlist=64, nprobe=8, faiss_depth=16)
  scores, ids = search.search(queries, store, 10, options, mesh)
  recovered = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact_ids)])
  assert recovered >= 0.95
  assert np.all(np.diff(scores, axis=1) <= 0)


def test_auto_index_picks_exact_for_small_colbert_and_flat_for_dpr():
  store = corpus.TokenStore.from_arrays(np.zeros((10, 4), np.float16), np.array([4, 6]))
  assert search.SearchOptions().resolve(store) == "exact"
  assert search.SearchOptions(exact_max_tokens=9).resolve(store) == "ivfpq"
  assert search.SearchOptions().resolve(corpus.DenseStore([np.zeros((3, 4), np.float32)])) == "flat"
  with pytest.raises(ValueError, match="index 'flat' does not apply to a TokenStore"):
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
  assert isinstance(store, corpus.TokenStore) and len(store.chunks) == 4
  tokens = colbert_encoder.tokenizer.encode_docs(texts)
  for i in (0, 9, 29):  # one at a time, full width, no sorting or bucketing
    alone = colbert_encoder.encode("doc", tokens["ids"][i:i + 1], tokens["mask"][i:i + 1])[0]
    expected = alone[tokens["score_mask"][i].astype(bool)]
    got, mask = store.gather(np.array([i]), store.max_length)
    np.testing.assert_allclose(got[0][mask[0].astype(bool)].astype(np.float32), expected, atol=1e-3)
    assert store.lengths[i] == tokens["score_mask"][i].sum()


def test_corpus_encoding_resumes_at_the_missing_chunk(colbert_encoder, tmp_path, monkeypatch):
  texts = corpus_texts()
  first = corpus.encode_corpus(colbert_encoder, texts, tmp_path, batch_size=8, chunk_size=8)
  reference = [np.array(c) for c in first.chunks]
  (tmp_path / "chunk_000002.lengths.npy").unlink()  # a crash between a chunk's two files
  encoded = []
  real = corpus.encode_chunk
  monkeypatch.setattr(corpus, "encode_chunk", lambda enc, t, *a: encoded.append(len(t)) or real(enc, t, *a))
  again = corpus.encode_corpus(colbert_encoder, texts, tmp_path, batch_size=8, chunk_size=8)
  assert encoded == [8]
  for a, b in zip(again.chunks, reference):
    np.testing.assert_array_equal(a, b)
  encoded.clear()
  corpus.encode_corpus(colbert_encoder, texts[:-1] + ["another text"], tmp_path, batch_size=8, chunk_size=8)
  assert encoded == [8, 8, 8, 6]  # another corpus: everything again


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
  settings = export.ColBERTSettings.from_model_config(config.model)
  out = export.export_colbert(tmp_path / "export", bert_config, params, tokenizer_dir, settings, pylate=False)
  imported = encoders.from_model_dir(out / "colbert")
  trained = encoders.from_params(config.model, bert_config, params, tokenizer_dir)
  assert imported.kind == "colbert" and imported.tokenizer.doc_maxlen == 48
  np.testing.assert_allclose(imported.encode_queries(TEXTS, 8), trained.encode_queries(TEXTS, 8), atol=1e-6)


def test_encoder_from_sentence_transformers_dir_equals_sentence_transformers(minilm_dir):
  encoder = encoders.from_model_dir(minilm_dir)
  assert (encoder.kind, encoder.module.pooling, encoder.normalize) == ("dpr", "mean", True)
  assert encoder.tokenizer.doc_maxlen == 256
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
