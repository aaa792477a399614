"""Teacher inputs: texts -> the per-item token fields a teacher model consumes.

Every builder makes batched tokenizer calls and returns one dict per item of UNPADDED 1-D int32 numpy
arrays (the caller buckets by length and pads); field names are the teacher module's argument names.

* `cross_encoder_inputs`: a BERT cross-encoder (sentence-transformers CrossEncoder semantics).
* `duobert_inputs`: duoBERT (Nogueira et al. 2019), `[CLS] q [SEP] d0 [SEP] d1 [SEP]`; the 2-label
  classifier's label 1 means "d0 is more relevant than d1", so P(d0 beats d1) = softmax(logits)[1].
* `monot5_inputs` / `duot5_inputs`: monoT5 / duoT5 prompts (pygaggle), scored by one decoder step on
  the logits of "true" (T5_TRUE_ID) and "false" (T5_FALSE_ID); see `true_false_log_probs`.
"""

import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

Item = dict[str, np.ndarray]
Tokenizer = transformers.PreTrainedTokenizerBase

MONOT5_PROMPT = "Query: {query} Document: {document} Relevant:"
DUOT5_PROMPT = "Query: {query} Document0: {document0} Document1: {document1} Relevant:"
T5_TRUE_ID = 1176  # "▁true" in the T5 SentencePiece vocabulary
T5_FALSE_ID = 6136  # "▁false"

_T5_TOKENIZER_FILES = ("tokenizer.json", "spiece.model")


def _texts(name: str, texts: Sequence[str]) -> list[str]:
  if isinstance(texts, str):
    raise TypeError(f"{name}: expected a sequence of texts, got a single string; wrap it in a list")
  return list(texts)


def _columns(**columns: Sequence[str]) -> list[list[str]]:
  """The text columns as lists, checked to have one entry per item."""
  lists = [_texts(name, texts) for name, texts in columns.items()]
  sizes = {name: len(texts) for name, texts in zip(columns, lists)}
  if len(set(sizes.values())) > 1:
    raise ValueError(f"the text lists must have one entry per item; their lengths differ: {sizes}")
  return lists


def _items(encoded: transformers.BatchEncoding, fields: Sequence[str]) -> list[Item]:
  """Per-item dicts of int32 arrays from a batched (unpadded) tokenizer output."""
  rows = zip(*(encoded[f] for f in fields))
  return [{f: np.asarray(row, np.int32) for f, row in zip(fields, values)} for values in rows]


def cross_encoder_inputs(tokenizer: Tokenizer, queries: Sequence[str], passages: Sequence[str],
                         max_length: int) -> list[Item]:
  """{'input_ids', 'token_type_ids', 'attention_mask'} of `[CLS] q [SEP] p [SEP]` per item.

  Exactly `tokenizer(queries, passages, truncation=True, max_length=max_length)` (truncation
  'longest_first', as sentence-transformers' CrossEncoder tokenises).
  """
  queries, passages = _columns(queries=queries, passages=passages)
  if not queries:
    return []
  encoded = tokenizer(queries, passages, truncation=True, max_length=max_length,
                      return_token_type_ids=True, return_attention_mask=True)
  return _items(encoded, ("input_ids", "token_type_ids", "attention_mask"))


def _special_id(tokenizer: Tokenizer, attribute: str) -> int:
  token_id = getattr(tokenizer, attribute)
  if token_id is None:
    raise ValueError(f"the tokenizer has no {attribute}; duoBERT needs a BERT WordPiece tokenizer "
                     f"with [CLS] and [SEP].")
  return token_id


def _token_ids(tokenizer: Tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
  """Token ids without special tokens, each list cut to `max_tokens`."""
  return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens,
                   return_attention_mask=False, return_token_type_ids=False)["input_ids"]


def duobert_inputs(tokenizer: Tokenizer, queries: Sequence[str], docs0: Sequence[str],
                   docs1: Sequence[str], max_length: int, query_maxlen: int = 62, *,
                   type_vocab_size: int) -> list[Item]:
  """{'input_ids', 'token_type_ids', 'attention_mask'} of `[CLS] q [SEP] d0 [SEP] d1 [SEP]` per item.

  As duoBERT builds them: the query is cut to `query_maxlen` tokens; the room left by `[CLS] q [SEP]`
  in `max_length` is split evenly between `d0 [SEP]` and `d1 [SEP]` (512 with a 62-token query:
  223 tokens per document). Token types are 0 on `[CLS] q [SEP]`, 1 on `d0 [SEP]`, and on
  `d1 [SEP]` 2 when the model has `type_vocab_size` >= 3, else 1. The model's label 1 means
  "d0 is more relevant than d1".
  """
  if query_maxlen < 1 or max_length < query_maxlen + 6:
    raise ValueError(f"max_length={max_length} with query_maxlen={query_maxlen} leaves no room for "
                     f"the documents; need query_maxlen >= 1 and max_length >= query_maxlen + 6.")
  queries, docs0, docs1 = _columns(queries=queries, docs0=docs0, docs1=docs1)
  if not queries:
    return []
  cls_id, sep_id = _special_id(tokenizer, "cls_token_id"), _special_id(tokenizer, "sep_token_id")
  second_type = 2 if type_vocab_size >= 3 else 1
  query_ids = _token_ids(tokenizer, queries, query_maxlen)
  widest_doc = (max_length - 2) // 2 - 1  # what a document may get next to an empty query
  doc0_ids, doc1_ids = (_token_ids(tokenizer, docs, widest_doc) for docs in (docs0, docs1))
  items = []
  for q, d0, d1 in zip(query_ids, doc0_ids, doc1_ids):
    doc_room = (max_length - len(q) - 2) // 2 - 1
    d0, d1 = d0[:doc_room], d1[:doc_room]
    ids = [cls_id, *q, sep_id, *d0, sep_id, *d1, sep_id]
    types = [0] * (len(q) + 2) + [1] * (len(d0) + 1) + [second_type] * (len(d1) + 1)
    items.append({"input_ids": np.asarray(ids, np.int32),
                  "token_type_ids": np.asarray(types, np.int32),
                  "attention_mask": np.ones(len(ids), np.int32)})
  return items


def _t5_items(tokenizer: Tokenizer, prompts: list[str], max_length: int) -> list[Item]:
  """{'input_ids', 'attention_mask'}: the prompts cut to `max_length` tokens, EOS kept last."""
  if not prompts:
    return []
  encoded = tokenizer(prompts, truncation=True, max_length=max_length, return_attention_mask=True)
  return _items(encoded, ("input_ids", "attention_mask"))


def monot5_inputs(tokenizer: Tokenizer, queries: Sequence[str], passages: Sequence[str],
                  max_length: int = 512) -> list[Item]:
  """monoT5 encoder inputs of MONOT5_PROMPT, truncated to `max_length` tokens (EOS included)."""
  queries, passages = _columns(queries=queries, passages=passages)
  prompts = [MONOT5_PROMPT.format(query=q, document=d) for q, d in zip(queries, passages)]
  return _t5_items(tokenizer, prompts, max_length)


def duot5_inputs(tokenizer: Tokenizer, queries: Sequence[str], docs0: Sequence[str],
                 docs1: Sequence[str], max_length: int = 360) -> list[Item]:
  """duoT5 encoder inputs of DUOT5_PROMPT, truncated to `max_length` tokens (EOS included).

  "true" scores "Document0 is more relevant than Document1".
  """
  queries, docs0, docs1 = _columns(queries=queries, docs0=docs0, docs1=docs1)
  prompts = [DUOT5_PROMPT.format(query=q, document0=d0, document1=d1)
             for q, d0, d1 in zip(queries, docs0, docs1)]
  return _t5_items(tokenizer, prompts, max_length)


def true_false_log_probs(logits_Bx2: jax.Array) -> jax.Array:
  """log_softmax over the (true, false) logits, float32: column 0 is log P(true)."""
  if logits_Bx2.shape[-1] != 2:
    raise ValueError(f"expected logits of (true, false) in the last axis (size 2), got shape "
                     f"{logits_Bx2.shape}; gather columns [T5_TRUE_ID, T5_FALSE_ID] first.")
  return jax.nn.log_softmax(jnp.asarray(logits_Bx2, jnp.float32), axis=-1)


def load_t5_tokenizer(directory: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerBase:
  """A fast T5 tokenizer from a local directory (never from the hub)."""
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise FileNotFoundError(f"T5 tokenizer directory {path} does not exist or is not a directory")
  if not any((path / name).is_file() for name in _T5_TOKENIZER_FILES):
    raise FileNotFoundError(
        f"{path} holds no T5 tokenizer files (expected one of {', '.join(_T5_TOKENIZER_FILES)}); "
        "point at a monoT5/duoT5 model directory saved with save_pretrained")
  tokenizer = transformers.T5TokenizerFast.from_pretrained(path, local_files_only=True)
  if not tokenizer.is_fast:
    raise TypeError(f"{path} loaded as a slow tokenizer ({type(tokenizer).__name__}); a fast one is "
                    "needed: add the model's tokenizer.json")
  if tokenizer.eos_token_id is None:
    raise ValueError(f"{path}: the tokenizer has no EOS token; T5 inputs end with </s>")
  return tokenizer
