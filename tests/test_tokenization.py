"""ColBERT and DPR tokenisation against ids looked up by hand in bert-base-uncased's vocab.txt."""

import pathlib
import string

import numpy as np
import pytest

from pairdistill_jax.data import tokenization

# Ids from vocab.txt (id = line number - 1).
PAD, Q, D, CLS, SEP, MASK = 0, 1, 2, 101, 102, 103
WHO, WROTE, HAMLET, QMARK = 2040, 2626, 8429, 1029
WHAT, IS, THE, CAPITAL, CITY = 2054, 2003, 1996, 3007, 2103
PARIS, COMMA, OF, FRANCE, BIG, PERIOD = 3000, 1010, 1997, 2605, 2502, 1012
TOKEN, IZATION, LPAREN, MAX, SI, M, RPAREN, SCORES, PASSAGES, BANG = (
    19204, 3989, 1006, 4098, 5332, 2213, 1007, 7644, 13768, 999)
QUICK, BROWN = 4248, 2829


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
  return tokenization.load_tokenizer(minilm_dir)


def _colbert(tok, **kwargs):
  return tokenization.ColBERTTokenizer(tok, **kwargs)


def test_short_query_is_padded_with_mask_tokens_that_are_not_attended(bert_tokenizer):
  out = _colbert(bert_tokenizer, query_maxlen=10).encode_queries(["Who wrote Hamlet?"])
  assert out["ids"].dtype == np.int32 and out["mask"].dtype == np.int32
  np.testing.assert_array_equal(out["ids"], [[CLS, Q, WHO, WROTE, HAMLET, QMARK, SEP, MASK, MASK, MASK]])
  np.testing.assert_array_equal(out["mask"], [[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])


def test_attend_to_mask_tokens_attends_everywhere(bert_tokenizer):
  colbert = _colbert(bert_tokenizer, query_maxlen=10, attend_to_mask_tokens=True)
  out = colbert.encode_queries(["Who wrote Hamlet?"])
  np.testing.assert_array_equal(out["ids"], [[CLS, Q, WHO, WROTE, HAMLET, QMARK, SEP, MASK, MASK, MASK]])
  np.testing.assert_array_equal(out["mask"], np.ones((1, 10)))


def test_long_query_is_truncated_keeping_sep_last(bert_tokenizer):
  out = _colbert(bert_tokenizer, query_maxlen=8).encode_queries(
      ["What is the capital city of France today", "who wrote hamlet"])
  np.testing.assert_array_equal(out["ids"], [
      [CLS, Q, WHAT, IS, THE, CAPITAL, CITY, SEP],
      [CLS, Q, WHO, WROTE, HAMLET, SEP, MASK, MASK],
  ])
  np.testing.assert_array_equal(out["mask"], [[1] * 8, [1] * 6 + [0] * 2])


def test_document_score_mask_drops_punctuation_and_padding(bert_tokenizer):
  out = _colbert(bert_tokenizer, doc_maxlen=16).encode_docs(
      ["Paris, the capital of France, is big.", "Tokenization (MaxSim) scores passages!"])
  np.testing.assert_array_equal(out["ids"], [
      [CLS, D, PARIS, COMMA, THE, CAPITAL, OF, FRANCE, COMMA, IS, BIG, PERIOD, SEP, PAD, PAD, PAD],
      [CLS, D, TOKEN, IZATION, LPAREN, MAX, SI, M, RPAREN, SCORES, PASSAGES, BANG, SEP, PAD, PAD, PAD],
  ])
  np.testing.assert_array_equal(out["mask"], [[1] * 13 + [0] * 3] * 2)
  np.testing.assert_array_equal(out["score_mask"], [
      [1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0],
  ])
  assert {k: v.dtype for k, v in out.items()} == {k: np.int32 for k in ("ids", "mask", "score_mask")}


def test_mask_punctuation_off_keeps_punctuation_scored(bert_tokenizer):
  out = _colbert(bert_tokenizer, doc_maxlen=12, mask_punctuation=False).encode_docs(["Paris, is big."])
  np.testing.assert_array_equal(out["ids"], [[CLS, D, PARIS, COMMA, IS, BIG, PERIOD, SEP] + [PAD] * 4])
  np.testing.assert_array_equal(out["score_mask"], [[1] * 8 + [0] * 4])


def test_long_document_is_truncated_to_doc_maxlen_keeping_sep(bert_tokenizer):
  colbert = _colbert(bert_tokenizer, doc_maxlen=6)
  out = colbert.encode_docs(["The quick brown fox jumps over the lazy dog", "big"])
  np.testing.assert_array_equal(out["ids"], [[CLS, D, THE, QUICK, BROWN, SEP], [CLS, D, BIG, SEP, PAD, PAD]])
  np.testing.assert_array_equal(out["mask"], [[1] * 6, [1, 1, 1, 1, 0, 0]])


def test_document_length_pads_beyond_doc_maxlen(bert_tokenizer):
  out = _colbert(bert_tokenizer, doc_maxlen=6).encode_docs(["The quick brown fox jumps"], length=9)
  np.testing.assert_array_equal(out["ids"], [[CLS, D, THE, QUICK, BROWN, SEP, PAD, PAD, PAD]])
  np.testing.assert_array_equal(out["score_mask"], [[1] * 6 + [0] * 3])


def test_document_length_below_doc_maxlen(bert_tokenizer):
  colbert = _colbert(bert_tokenizer, doc_maxlen=10)
  out = colbert.encode_docs(["big", "the quick"], length=5)
  np.testing.assert_array_equal(out["ids"], [[CLS, D, BIG, SEP, PAD], [CLS, D, THE, QUICK, SEP]])
  with pytest.raises(ValueError, match="length=4 is shorter than a document"):
    colbert.encode_docs(["big", "the quick"], length=4)


def test_skiplist_is_every_punctuation_character(bert_tokenizer, minilm_dir):
  vocab = (pathlib.Path(minilm_dir) / "vocab.txt").read_text(encoding="utf-8").split("\n")
  expected = {vocab.index(symbol) for symbol in string.punctuation}
  assert len(expected) == 32 and {COMMA, PERIOD, BANG, LPAREN, RPAREN, QMARK} <= expected
  assert _colbert(bert_tokenizer).skiplist_ids == expected


# Hand-written English with the punctuation, digits, accents and symbols of scientific abstracts; the last
# documents are long enough to be truncated at 180 tokens.
_SENTENCES = [
    "Microglia (the brain's resident macrophages) respond to β-amyloid within 24 h, in vitro and in vivo.",
    "We measured serum IL-6 levels in 1,204 adults; 37.5% had values above 7 pg/mL [95% CI: 33.1-41.9].",
    "Does vitamin D supplementation reduce fracture risk? Meta-analyses disagree, e.g. Smith et al. (2019).",
    "The café's naïve staff—unlike the control group—reported \"no change\" after 6 weeks: p = 0.41.",
    "CRISPR/Cas9 knock-outs of TP53 increased proliferation ~2-fold, whereas MYC over-expression did not!",
    "Mice fed a high-fat diet (60% kcal) gained 12 ± 3 g; insulin resistance followed at week eight.",
]
ENGLISH_DOCS = [" ".join(_SENTENCES[i:] + _SENTENCES[:i]) for i in range(len(_SENTENCES))] + [
    " ".join(_SENTENCES * 3), " ".join(reversed(_SENTENCES * 2)), _SENTENCES[0], "Short; text."]
ENGLISH_QUERIES = [
    "Microglia respond to amyloid-beta within a day.", "IL-6 is elevated in 37.5% of adults?",
    "Vitamin D (cholecalciferol) prevents fractures.", "TP53 loss doubles proliferation!",
    "High-fat diets cause insulin resistance in mice, in 8 weeks or fewer, regardless of strain, sex or age.",
    "naïve café staff", "p < 0.05", "What do meta-analyses of supplementation trials in elderly women conclude "
    "about hip fractures, falls, and all-cause mortality over five or more years of follow-up?"]


def test_matches_stanford_colbert_recipe(bert_tokenizer):
  """Stanford ColBERTv2 prepends '. ' and overwrites that token with the marker; the result must agree."""
  docs, queries = ENGLISH_DOCS, ENGLISH_QUERIES
  colbert = _colbert(bert_tokenizer, query_maxlen=32, doc_maxlen=180)

  ref_q = bert_tokenizer([". " + q for q in queries], padding="max_length", truncation=True, max_length=32)
  ref_q_ids = np.array(ref_q["input_ids"])
  ref_q_ids[:, 1] = Q
  ref_q_ids[ref_q_ids == PAD] = MASK
  out_q = colbert.encode_queries(queries)
  np.testing.assert_array_equal(out_q["ids"], ref_q_ids)
  np.testing.assert_array_equal(out_q["mask"], ref_q["attention_mask"])

  ref_d = bert_tokenizer([". " + d for d in docs], padding="max_length", truncation="longest_first",
                         max_length=180)
  ref_d_ids = np.array(ref_d["input_ids"])
  ref_d_ids[:, 1] = D
  punctuation = {bert_tokenizer.convert_tokens_to_ids(c) for c in string.punctuation}
  ref_score_mask = [[int(x != PAD and x not in punctuation) for x in row] for row in ref_d_ids.tolist()]
  out_d = colbert.encode_docs(docs)
  np.testing.assert_array_equal(out_d["ids"], ref_d_ids)
  np.testing.assert_array_equal(out_d["mask"], ref_d["attention_mask"])
  np.testing.assert_array_equal(out_d["score_mask"], ref_score_mask)
  assert (out_d["mask"].sum(axis=1) == 180).any(), "no document was long enough to test truncation"


def test_empty_batch_gives_empty_arrays(bert_tokenizer):
  out = _colbert(bert_tokenizer, doc_maxlen=12).encode_docs([])
  assert out["ids"].shape == (0, 12) and out["score_mask"].shape == (0, 12)


def test_single_string_is_rejected(bert_tokenizer):
  with pytest.raises(TypeError, match="single string"):
    _colbert(bert_tokenizer).encode_queries("who wrote hamlet")


def test_dpr_query_and_passage(bert_tokenizer):
  dpr = tokenization.DPRTokenizer(bert_tokenizer, query_maxlen=8, doc_maxlen=6)
  query = dpr.encode_queries(["Who wrote Hamlet?"])
  np.testing.assert_array_equal(query["ids"], [[CLS, WHO, WROTE, HAMLET, QMARK, SEP, PAD, PAD]])
  np.testing.assert_array_equal(query["mask"], [[1, 1, 1, 1, 1, 1, 0, 0]])
  passage = dpr.encode_docs(["Paris, the capital of France, is big.", "big"])
  np.testing.assert_array_equal(passage["ids"], [
      [CLS, PARIS, COMMA, THE, CAPITAL, SEP],
      [CLS, BIG, SEP, PAD, PAD, PAD],
  ])
  np.testing.assert_array_equal(passage["mask"], [[1] * 6, [1, 1, 1, 0, 0, 0]])
  wide = dpr.encode_docs(["big"], length=8)
  np.testing.assert_array_equal(wide["ids"], [[CLS, BIG, SEP, PAD, PAD, PAD, PAD, PAD]])
  assert {v.dtype for v in (*query.values(), *passage.values())} == {np.dtype(np.int32)}


def test_directory_without_tokenizer_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path} holds no tokenizer files"):
    tokenization.load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tokenization.load_tokenizer(tmp_path / "missing")


def test_vocab_only_directory_loads_bert_wordpiece(tmp_path, minilm_dir):
  (tmp_path / "vocab.txt").write_bytes((pathlib.Path(minilm_dir) / "vocab.txt").read_bytes())
  tok = tokenization.load_tokenizer(tmp_path)
  assert tok.is_fast
  assert tok("Who wrote Hamlet?")["input_ids"] == [CLS, WHO, WROTE, HAMLET, QMARK, SEP]


def test_vocabulary_without_marker_tokens(tmp_path):
  tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "."]
  (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
  tok = tokenization.load_tokenizer(tmp_path)
  with pytest.raises(ValueError, match=r"no query marker token '\[unused0\]'"):
    tokenization.ColBERTTokenizer(tok)
