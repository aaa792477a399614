"""The shared writers of the PyTorch serving directories that the student kinds export (students/*.py):
sentence-transformers directories (a BertModel at the root, then Pooling / Normalize or other modules), their
module lists and configs, and the training lengths they record.

Every directory records the query and document lengths the model was trained with, where its readers look:
artifact.metadata (`query_maxlen`, `doc_maxlen`); `query_length` / `document_length` in
config_sentence_transformers.json (PyLate's names; sentence-transformers reads only the keys it knows, and its
max_seq_length is the tower's own length) or, for the `transformers` DPR directories, in config.json.
`retrieval.encoders.from_model_dir` reads them back.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from pairdistill_jax.convert import hf_io
from pairdistill_jax.models.bert import BertConfig

PathLike = str | os.PathLike

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
# sentence-transformers' Pooling config flag of each pooling mode
ST_POOLING_MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                    "max": "pooling_mode_max_tokens"}



def length_fields(query_maxlen: int, doc_maxlen: int) -> dict[str, int]:
  """The training lengths as a bi-encoder directory records them (PyLate's key names)."""
  return {"query_length": query_maxlen, "document_length": doc_maxlen}


def write_json(path: pathlib.Path, value: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2) + "\n")


def write_st_modules(directory: pathlib.Path, after: Sequence[tuple[str, str]], max_seq_length: int,
                     model_config: Mapping[str, Any]) -> None:
  """modules.json (Transformer at the root, then the (path, type) modules `after`) and the root's ST configs."""
  modules = [("", _ST_TRANSFORMER), *after]
  write_json(directory / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": module_type}
                                          for i, (path, module_type) in enumerate(modules)])
  for path, _ in after:
    (directory / path).mkdir(exist_ok=True)  # sentence-transformers loads each module from its directory
  write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
  write_json(directory / "config_sentence_transformers.json", dict(model_config))


def write_sentence_transformer(directory: pathlib.Path, bert_config: BertConfig, bert_params: Mapping,
                               tokenizer_dir: PathLike, *, pooling: str, normalize: bool, max_seq_length: int,
                               lengths: Mapping[str, int]) -> None:
  """A sentence-transformers directory: BertModel at the root, then Pooling [then Normalize]; dot-product
  (cosine) similarity; the training `lengths` of both towers recorded in config_sentence_transformers.json."""
  hf_io.export_bert(directory, bert_config, bert_params, tokenizer_dir=tokenizer_dir)
  after = [("1_Pooling", _ST_POOLING)] + ([("2_Normalize", _ST_NORMALIZE)] if normalize else [])
  write_st_modules(directory, after, max_seq_length,
                   {"similarity_fn_name": "cosine" if normalize else "dot", "prompts": {},
                    "default_prompt_name": None, **lengths})
  write_json(directory / "1_Pooling" / "config.json", {
      "word_embedding_dimension": bert_config.hidden_size,
      **{flag: pooling == mode for mode, flag in ST_POOLING_MODES.items()},
      "pooling_mode_mean_sqrt_len_tokens": False})
