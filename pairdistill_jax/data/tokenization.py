"""Tokenisers for the students: ColBERT (stanford ColBERTv2 semantics) and DPR (dpr-scale semantics).

Both wrap a fast BERT WordPiece tokenizer, make batched calls and return fixed-shape int32 numpy arrays
(jit-friendly). ColBERT queries are `[CLS] [Q] q_1 … [SEP]` padded with `[MASK]` (query augmentation);
ColBERT documents are `[CLS] [D] d_1 … [SEP]` padded with `[PAD]`, with a score mask that drops padding
and punctuation from MaxSim.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import string
from collections.abc import Sequence

import numpy as np
import transformers

from pairdistill_jax.students import registry as students

_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")


def student_tokenizer(model_config, directory: str | os.PathLike[str], *, query_maxlen: int = 0,
                      doc_maxlen: int = 0):
  """The tokenizer of the student `config.model` describes (its kind's, e.g. ColBERT markers and [MASK]
  augmentation, or plain DPR) over the HF tokenizer in `directory`; maxlens of 0 keep the model's."""
  return students.get(model_config.kind).tokenizer(
      load_tokenizer(directory), model_config, query_maxlen=query_maxlen or model_config.query_maxlen,
      doc_maxlen=doc_maxlen or model_config.doc_maxlen)


def load_tokenizer(directory: str | os.PathLike[str]) -> transformers.PreTrainedTokenizerFast:
  """Loads a fast BERT WordPiece tokenizer from a local directory (never from the hub).

  Uses the directory's `tokenizer_config.json` when present (casing, special tokens); a directory with
  only `vocab.txt` or `tokenizer.json` is read as a BERT tokenizer with BERT's defaults.
  """
  path = pathlib.Path(directory)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer directory {path} does not exist or is not a directory")
  if not any((path / name).is_file() for name in _TOKENIZER_FILES):
    raise FileNotFoundError(
        f"{path} holds no tokenizer files (expected one of {', '.join(_TOKENIZER_FILES)}); "
        "point at a model directory saved with save_pretrained"
    )
  if (path / "tokenizer_config.json").is_file():
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  else:
    tokenizer = transformers.BertTokenizer.from_pretrained(path, local_files_only=True)
  if not tokenizer.is_fast:
    raise TypeError(f"{path} loaded as a slow tokenizer ({type(tokenizer).__name__}); a fast one is needed")
  return tokenizer


def _token_id(tokenizer: transformers.PreTrainedTokenizerFast, token: str | None, role: str) -> int:
  """The vocabulary id of `token`, or an error saying which special token is missing."""
  vocab = tokenizer.get_vocab()
  if token is None or token not in vocab:
    raise ValueError(
        f"the tokenizer's vocabulary has no {role} token {token!r}; use a BERT WordPiece vocabulary "
        "(e.g. bert-base-uncased) or set the marker token to one the vocabulary holds"
    )
  return vocab[token]


def _check_maxlen(name: str, value: int) -> None:
  if value < 3:
    raise ValueError(f"{name}={value} is too small: it must leave room for [CLS], the marker and [SEP]")


def _encode(
    tokenizer: transformers.PreTrainedTokenizerFast, texts: Sequence[str], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
  """`[CLS] t_1 … [SEP]` truncated and padded with the pad id to `max_length`; returns (ids, mask)."""
  if isinstance(texts, str):
    raise TypeError("expected a sequence of texts, got a single string; wrap it in a list")
  if not texts:
    empty_0xL = np.zeros((0, max_length), np.int32)
    return empty_0xL, empty_0xL
  encoded = tokenizer(
      list(texts),
      max_length=max_length,
      truncation=True,
      padding="max_length",
      return_attention_mask=True,
      return_token_type_ids=False,
      return_tensors="np",
  )
  return encoded["input_ids"].astype(np.int32), encoded["attention_mask"].astype(np.int32)


def _insert_marker(
    ids_BxL: np.ndarray, mask_BxL: np.ndarray, marker_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Inserts `marker_id` (attended) at position 1 of every row."""
  ids_BxL1 = np.insert(ids_BxL, 1, marker_id, axis=1)
  mask_BxL1 = np.insert(mask_BxL, 1, 1, axis=1)
  return ids_BxL1, mask_BxL1


def _fit_length(
    ids_BxL: np.ndarray, mask_BxL: np.ndarray, length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Pads (with `pad_id`, mask 0) or cuts padding columns so rows are exactly `length` wide."""
  width = ids_BxL.shape[1]
  if length >= width:
    extra = ((0, 0), (0, length - width))
    return np.pad(ids_BxL, extra, constant_values=pad_id), np.pad(mask_BxL, extra)
  longest = int(mask_BxL.sum(axis=1).max(initial=0))
  if longest > length:
    raise ValueError(
        f"length={length} is shorter than a document of this batch ({longest} tokens after truncation "
        f"to doc_maxlen={width}); pass length >= {longest} or leave it None"
    )
  return ids_BxL[:, :length], mask_BxL[:, :length]


@dataclasses.dataclass
class ColBERTTokenizer:
  """ColBERTv2 query and document encoding.

  `skiplist_ids` (derived) holds the ids of every character of `string.punctuation`, as stanford
  ColBERT builds its skiplist; document tokens with those ids are excluded from MaxSim when
  `mask_punctuation`.
  """

  tokenizer: transformers.PreTrainedTokenizerFast
  query_maxlen: int = 32
  doc_maxlen: int = 180
  mask_punctuation: bool = True
  attend_to_mask_tokens: bool = False
  query_token: str = "[unused0]"
  doc_token: str = "[unused1]"
  skiplist_ids: frozenset[int] = dataclasses.field(init=False, repr=False)
  _skiplist_S: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
  _ids: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self) -> None:
    _check_maxlen("query_maxlen", self.query_maxlen)
    _check_maxlen("doc_maxlen", self.doc_maxlen)
    tok = self.tokenizer
    self._ids = {
        "query": _token_id(tok, self.query_token, "query marker"),
        "doc": _token_id(tok, self.doc_token, "document marker"),
        "mask": _token_id(tok, tok.mask_token, "mask"),
        "pad": _token_id(tok, tok.pad_token, "pad"),
    }
    symbols = tok(list(string.punctuation), add_special_tokens=False)["input_ids"]
    self.skiplist_ids = frozenset(ids[0] for ids in symbols)
    self._skiplist_S = np.array(sorted(self.skiplist_ids), dtype=np.int32)

  def encode_queries(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{'ids', 'mask'}: int32, one row of exactly `query_maxlen` tokens per query."""
    ids_BxL, mask_BxL = _encode(self.tokenizer, texts, self.query_maxlen - 1)
    ids_BxQ, mask_BxQ = _insert_marker(ids_BxL, mask_BxL, self._ids["query"])
    ids_BxQ = np.where(mask_BxQ == 1, ids_BxQ, np.int32(self._ids["mask"]))
    if self.attend_to_mask_tokens:
      mask_BxQ = np.ones_like(mask_BxQ)
    return {"ids": ids_BxQ, "mask": mask_BxQ}

  def encode_docs(self, texts: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """{'ids', 'mask', 'score_mask'}: int32, rows `length` (default `doc_maxlen`) wide.

    Documents are truncated to `doc_maxlen` tokens; a `length` below `doc_maxlen` is allowed when every
    document of the batch fits in it. `score_mask` is `mask` without the punctuation skiplist (when
    `mask_punctuation`).
    """
    ids_BxL, mask_BxL = _encode(self.tokenizer, texts, self.doc_maxlen - 1)
    ids_BxL, mask_BxL = _insert_marker(ids_BxL, mask_BxL, self._ids["doc"])
    width = self.doc_maxlen if length is None else length
    ids_BxL, mask_BxL = _fit_length(ids_BxL, mask_BxL, width, self._ids["pad"])
    score_mask_BxL = mask_BxL
    if self.mask_punctuation:
      score_mask_BxL = mask_BxL * ~np.isin(ids_BxL, self._skiplist_S)
    return {"ids": ids_BxL, "mask": mask_BxL, "score_mask": score_mask_BxL.astype(np.int32)}

  def score_skip_table(self) -> np.ndarray:
    """A vocabulary-sized table of the token ids that `score_mask` drops (pre-tokenised batches use it)."""
    table = np.zeros(len(self.tokenizer), bool)
    if self.mask_punctuation:
      table[self._skiplist_S] = True
    return table


@dataclasses.dataclass
class DPRTokenizer:
  """DPR (dpr-scale) encoding: `[CLS] t_1 … [SEP] [PAD] …`, the same for queries and passages."""

  tokenizer: transformers.PreTrainedTokenizerFast
  query_maxlen: int = 64
  doc_maxlen: int = 128
  _pad_id: int = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self) -> None:
    for name in ("query_maxlen", "doc_maxlen"):
      if getattr(self, name) < 2:
        raise ValueError(f"{name}={getattr(self, name)} is too small: it must leave room for [CLS] and [SEP]")
    self._pad_id = _token_id(self.tokenizer, self.tokenizer.pad_token, "pad")

  def encode_queries(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{'ids', 'mask'}: int32, one row of exactly `query_maxlen` tokens per query."""
    ids_BxL, mask_BxL = _encode(self.tokenizer, texts, self.query_maxlen)
    return {"ids": ids_BxL, "mask": mask_BxL}

  def encode_docs(self, texts: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """{'ids', 'mask'}: int32; passages truncated to `doc_maxlen`, rows `length` (default: that) wide."""
    ids_BxL, mask_BxL = _encode(self.tokenizer, texts, self.doc_maxlen)
    width = self.doc_maxlen if length is None else length
    ids_BxL, mask_BxL = _fit_length(ids_BxL, mask_BxL, width, self._pad_id)
    return {"ids": ids_BxL, "mask": mask_BxL}

  def score_skip_table(self) -> None:
    """None: passages have no score mask (every token is pooled)."""
    return None
