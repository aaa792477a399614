"""Teacher input builders: cross-encoder, duoBERT, monoT5 / duoT5 layouts; (true, false) log-probs."""

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from pairdistill_jax.teachers import inputs

T5_WORDS = ["<pad>", "</s>", "<unk>", "▁Query:", "▁Document:", "▁Document0:", "▁Document1:",
            "▁Relevant:", "▁what", "▁is", "▁a", "▁cat", "▁dog", "▁barks"]
T5_ID = {w: i for i, w in enumerate(T5_WORDS)}
EOS = T5_ID["</s>"]


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
  return transformers.AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
  """A tiny T5 tokenizer (whole-word Unigram pieces, </s> appended) saved with save_pretrained."""
  tok = tokenizers.Tokenizer(models.Unigram([(w, -1.0) for w in T5_WORDS], unk_id=T5_ID["<unk>"]))
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
  tok.post_processor = processors.TemplateProcessing(
      single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)])
  directory = tmp_path_factory.mktemp("t5_tokenizer")
  transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>",
                               pad_token="<pad>", extra_ids=0).save_pretrained(directory)
  return directory


def _t5_ids(words: str) -> list[int]:
  return [T5_ID["▁" + w] for w in words.split()]


def _wordpiece_ids(tokenizer, words: str) -> list[int]:
  """Vocabulary ids of space-separated words that are each one WordPiece token."""
  ids = tokenizer.convert_tokens_to_ids(words.split())
  assert tokenizer.unk_token_id not in ids
  return ids


def test_cross_encoder_inputs_equal_the_pair_call(bert_tokenizer):
  queries = ["what is a cat", "how long do dogs live?"]
  passages = ["a cat is a small domesticated carnivorous mammal " * 6, "about ten to thirteen years"]
  items = inputs.cross_encoder_inputs(bert_tokenizer, queries, passages, max_length=24)
  want = bert_tokenizer(queries, passages, truncation=True, max_length=24)
  assert len(items) == 2 and len(items[0]["input_ids"]) == 24
  for i, item in enumerate(items):
    assert set(item) == {"input_ids", "token_type_ids", "attention_mask"}
    for field, value in item.items():
      assert value.dtype == np.int32 and value.ndim == 1
      assert value.tolist() == want[field][i]


def test_duobert_layout_by_hand(bert_tokenizer):
  cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
  q, d0, d1 = "what is a cat", "a cat is an animal", "dogs bark"
  q_ids, d0_ids, d1_ids = (_wordpiece_ids(bert_tokenizer, t) for t in (q, d0, d1))
  want_ids = [cls, *q_ids, sep, *d0_ids, sep, *d1_ids, sep]
  for type_vocab_size, second in ((3, 2), (2, 1)):
    (item,) = inputs.duobert_inputs(bert_tokenizer, [q], [d0], [d1], max_length=128,
                                    type_vocab_size=type_vocab_size)
    assert item["input_ids"].tolist() == want_ids
    assert item["token_type_ids"].tolist() == [0] * 6 + [1] * 6 + [second] * 3
    assert item["attention_mask"].tolist() == [1] * len(want_ids)
    assert all(v.dtype == np.int32 for v in item.values())


def test_duobert_truncation_splits_the_rest_evenly(bert_tokenizer):
  cls, sep = bert_tokenizer.cls_token_id, bert_tokenizer.sep_token_id
  words = "one two three four five six seven"
  ids = _wordpiece_ids(bert_tokenizer, words)
  # query cut to 3; [CLS] q [SEP] is 5 of 15, so each document gets (15 - 5) // 2 = 5 = 4 tokens + [SEP]
  (item,) = inputs.duobert_inputs(bert_tokenizer, [words], [words], ["one two"], max_length=15,
                                  query_maxlen=3, type_vocab_size=3)
  assert item["input_ids"].tolist() == [cls, *ids[:3], sep, *ids[:4], sep, *ids[:2], sep]
  assert item["token_type_ids"].tolist() == [0] * 5 + [1] * 5 + [2] * 3
  # a one-token query leaves (15 - 3) // 2 = 6 per document: 5 tokens + [SEP]
  (item,) = inputs.duobert_inputs(bert_tokenizer, ["one"], [words], [words], max_length=15,
                                  query_maxlen=3, type_vocab_size=2)
  assert item["input_ids"].tolist() == [cls, ids[0], sep, *ids[:5], sep, *ids[:5], sep]
  assert item["token_type_ids"].tolist() == [0] * 3 + [1] * 12


def test_duobert_paper_lengths(bert_tokenizer):
  (item,) = inputs.duobert_inputs(bert_tokenizer, ["cat " * 100], ["dog " * 300], ["cat " * 300],
                                  max_length=512, type_vocab_size=3)
  types = item["token_type_ids"]
  assert len(item["input_ids"]) == 512
  assert [(types == t).sum() for t in (0, 1, 2)] == [62 + 2, 223 + 1, 223 + 1]


def test_duobert_rejects_bad_arguments(bert_tokenizer):
  with pytest.raises(ValueError, match="no room"):
    inputs.duobert_inputs(bert_tokenizer, ["a"], ["b"], ["c"], max_length=67, type_vocab_size=2)
  with pytest.raises(ValueError, match="lengths differ"):
    inputs.duobert_inputs(bert_tokenizer, ["a", "b"], ["b"], ["c"], max_length=128,
                          type_vocab_size=2)
  with pytest.raises(TypeError, match="single string"):
    inputs.cross_encoder_inputs(bert_tokenizer, "a query", ["b"], max_length=32)


def test_monot5_prompt(t5_dir):
  tokenizer = inputs.load_t5_tokenizer(t5_dir)
  items = inputs.monot5_inputs(tokenizer, ["what is a cat", "dog"], ["a cat", "a dog barks"])
  assert [item["input_ids"].tolist() for item in items] == [
      [T5_ID["▁Query:"], *_t5_ids("what is a cat"), T5_ID["▁Document:"], *_t5_ids("a cat"),
       T5_ID["▁Relevant:"], EOS],
      [T5_ID["▁Query:"], *_t5_ids("dog"), T5_ID["▁Document:"], *_t5_ids("a dog barks"),
       T5_ID["▁Relevant:"], EOS]]
  assert items[1]["attention_mask"].tolist() == [1] * 8
  assert set(items[0]) == {"input_ids", "attention_mask"}
  assert items[0]["input_ids"].dtype == np.int32


def test_duot5_prompt_and_truncation_to_360(t5_dir):
  tokenizer = inputs.load_t5_tokenizer(t5_dir)
  long_doc = "a dog barks " * 200
  items = inputs.duot5_inputs(tokenizer, ["what is a cat"] * 2, ["a cat", long_doc],
                              ["a dog barks", "a cat"])
  assert items[0]["input_ids"].tolist() == [
      T5_ID["▁Query:"], *_t5_ids("what is a cat"), T5_ID["▁Document0:"], *_t5_ids("a cat"),
      T5_ID["▁Document1:"], *_t5_ids("a dog barks"), T5_ID["▁Relevant:"], EOS]
  full = [T5_ID["▁Query:"], *_t5_ids("what is a cat"), T5_ID["▁Document0:"], *_t5_ids(long_doc)]
  assert items[1]["input_ids"].tolist() == full[:359] + [EOS]
  assert items[1]["attention_mask"].tolist() == [1] * 360


def test_monot5_truncation_keeps_eos(t5_dir):
  tokenizer = inputs.load_t5_tokenizer(t5_dir)
  (item,) = inputs.monot5_inputs(tokenizer, ["what is a cat"], ["a cat"], max_length=4)
  assert item["input_ids"].tolist() == [T5_ID["▁Query:"], *_t5_ids("what is"), EOS]


def test_load_t5_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    inputs.load_t5_tokenizer(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="no T5 tokenizer files"):
    inputs.load_t5_tokenizer(tmp_path)


def test_true_false_log_probs_by_hand():
  logits = np.array([[2.0, -1.0], [-3.5, 0.25], [40.0, -40.0], [0.0, 0.0]], np.float32)
  a, b = logits.astype(np.float64).T
  want_true = np.log(np.exp(a) / (np.exp(a) + np.exp(b)))
  want_false = np.log(np.exp(b) / (np.exp(a) + np.exp(b)))
  got = np.asarray(inputs.true_false_log_probs(logits))
  assert got.dtype == np.float32 and got.shape == (4, 2)
  np.testing.assert_allclose(got[:, 0], want_true, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[:, 1], want_false, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="size 2"):
    inputs.true_false_log_probs(np.zeros((2, 3), np.float32))
