"""Export of trained students to the PyTorch serving stacks, each export one atomically written directory.

ColBERT -> `colbert/`: a stanford ColBERT checkpoint (HF_ColBERT: `bert.*` + `linear.weight`, config.json,
           tokenizer files, artifact.metadata with the model fields); stanford `colbert-ai` and PyLate load it.
           `pylate/`: the same weights as a PyLate-native sentence-transformers directory (prefixes
           `[unused0]`/`[unused1]`, so no tokens are added to the vocabulary).
DPR     -> `query_encoder/`, `passage_encoder/`: sentence-transformers directories (the model's pooling, dot
           similarity); `dpr_question_encoder/`, `dpr_context_encoder/`: `transformers` DPRQuestionEncoder /
           DPRContextEncoder directories (written for [CLS] pooling only: that is what those classes compute).

Every directory records the query and document lengths the model was trained with, where its readers look:
artifact.metadata (`query_maxlen`, `doc_maxlen`); `query_length` / `document_length` in
config_sentence_transformers.json (PyLate's names; sentence-transformers reads only the keys it knows, and its
max_seq_length is the tower's own length) or, for the `transformers` DPR directories, in config.json.
`retrieval.encoders.from_model_dir` reads them back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import numpy as np

from pairdistill_jax.convert import hf_io
from pairdistill_jax.models.bert import BertConfig

if TYPE_CHECKING:
  from pairdistill_jax.checkpoint import TrainedModel

PathLike = str | os.PathLike

COLBERT_DIR = "colbert"
PYLATE_DIR = "pylate"
QUERY_ST_DIR = "query_encoder"
PASSAGE_ST_DIR = "passage_encoder"
DPR_QUESTION_DIR = "dpr_question_encoder"
DPR_CONTEXT_DIR = "dpr_context_encoder"

_ST_TRANSFORMER = "sentence_transformers.models.Transformer"
_ST_POOLING = "sentence_transformers.models.Pooling"
_ST_NORMALIZE = "sentence_transformers.models.Normalize"
_PYLATE_DENSE = "pylate.models.Dense.Dense"
_DPR_PREFIXES = {"DPRQuestionEncoder": "question_encoder.bert_model.",
                 "DPRContextEncoder": "ctx_encoder.bert_model."}

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ColBERTSettings:
  """The ColBERT model fields that travel with the weights (stanford `artifact.metadata` names)."""

  dim: int = 128
  query_maxlen: int = 32
  doc_maxlen: int = 180
  mask_punctuation: bool = True
  attend_to_mask_tokens: bool = False
  query_token_id: str = "[unused0]"
  doc_token_id: str = "[unused1]"

  @classmethod
  def from_model_config(cls, model_config: Mapping[str, Any]) -> "ColBERTSettings":
    """From `config.model` of a ColBERT run."""
    return cls(dim=model_config["dim"], query_maxlen=model_config["query_maxlen"],
               doc_maxlen=model_config["doc_maxlen"], mask_punctuation=model_config["mask_punctuation"],
               attend_to_mask_tokens=model_config["attend_to_mask_tokens"])

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any]) -> "ColBERTSettings":
    """From a stanford artifact.metadata dict (its `config` entry when nested); absent fields keep defaults."""
    metadata = metadata.get("config", metadata)
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in metadata.items() if k in names})

  def artifact_metadata(self) -> dict[str, Any]:
    """The stanford ColBERTConfig model fields (`[Q]`/`[D]` are stanford's display names of the markers)."""
    return {**dataclasses.asdict(self), "query_token": "[Q]", "doc_token": "[D]", "similarity": "cosine",
            "interaction": "colbert"}


def export_colbert(directory: PathLike, bert_config: BertConfig, params: Mapping, tokenizer_dir: PathLike,
                   settings: ColBERTSettings, *, pylate: bool = True) -> pathlib.Path:
  """Writes DIRECTORY/colbert (stanford) and, with `pylate`, DIRECTORY/pylate; returns DIRECTORY.

  `params` is the ColBERT tree {'bert': ..., 'linear': {'kernel': [H, dim]}} (boxed or plain).
  """
  params = nn.meta.unbox(params)
  linear_DxH = _linear_weight(params, bert_config, settings)
  with hf_io._atomic_directory(pathlib.Path(directory)) as tmp:  # pylint: disable=protected-access
    hf_io.export_bert(tmp / COLBERT_DIR, bert_config, params["bert"], prefix="bert.",
                      extra_tensors={"linear.weight": linear_DxH},
                      config_extra={"architectures": ["HF_ColBERT"]}, tokenizer_dir=tokenizer_dir)
    _write_json(tmp / COLBERT_DIR / hf_io.COLBERT_METADATA, settings.artifact_metadata())
    if pylate:
      _write_pylate(tmp / PYLATE_DIR, bert_config, params["bert"], linear_DxH, tokenizer_dir, settings)
  return pathlib.Path(directory)


def export_dpr(directory: PathLike, bert_config: BertConfig, params: Mapping, tokenizer_dir: PathLike, *,
               pooling: str, query_maxlen: int, doc_maxlen: int, normalize: bool = False) -> pathlib.Path:
  """Writes the sentence-transformers and (for [CLS] pooling) `transformers` DPR directories; returns DIRECTORY.

  A `normalize`d student's sentence-transformers directories end in a Normalize module.
  `params` is the DPR tree: {'query_encoder': ..., 'passage_encoder': ...} or {'encoder': ...} (shared).
  """
  if pooling not in ("cls", "mean"):
    raise ValueError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
  params = nn.meta.unbox(params)
  query_params, passage_params = _towers(params)
  with hf_io._atomic_directory(pathlib.Path(directory)) as tmp:  # pylint: disable=protected-access
    lengths = _length_fields(query_maxlen, doc_maxlen)
    _write_sentence_transformer(tmp / QUERY_ST_DIR, bert_config, query_params, tokenizer_dir,
                                pooling=pooling, normalize=normalize, max_seq_length=query_maxlen, lengths=lengths)
    _write_sentence_transformer(tmp / PASSAGE_ST_DIR, bert_config, passage_params, tokenizer_dir,
                                pooling=pooling, normalize=normalize, max_seq_length=doc_maxlen, lengths=lengths)
    if pooling == "cls" and not normalize:
      _write_dpr_encoder(tmp / DPR_QUESTION_DIR, "DPRQuestionEncoder", bert_config, query_params, tokenizer_dir,
                         lengths)
      _write_dpr_encoder(tmp / DPR_CONTEXT_DIR, "DPRContextEncoder", bert_config, passage_params,
                         tokenizer_dir, lengths)
    else:
      _log.warning("%s DPR: exported as sentence-transformers only (transformers' DPR encoders return the "
                   "unnormalised [CLS] vector, which is not this model's embedding).",
                   "Normalised" if normalize else "Mean-pooled")
  return pathlib.Path(directory)


def export_trained(trained: TrainedModel, directory: PathLike) -> pathlib.Path:
  """Exports a trained model (the workdir's checkpoint) by its model kind."""
  m = trained.config.model
  if m.kind == "colbert":
    return export_colbert(directory, trained.bert_config, trained.params, trained.tokenizer_dir,
                          ColBERTSettings.from_model_config(m))
  return export_dpr(directory, trained.bert_config, trained.params, trained.tokenizer_dir, pooling=m.pooling,
                    query_maxlen=m.query_maxlen, doc_maxlen=m.doc_maxlen, normalize=m.get("normalize", False))


def _linear_weight(params: Mapping, bert_config: BertConfig, settings: ColBERTSettings) -> np.ndarray:
  """The ColBERT projection as a PyTorch Linear weight [dim, H]."""
  if set(params) != {"bert", "linear"}:
    raise ValueError(f"ColBERT params must hold exactly 'bert' and 'linear', found {sorted(params)}")
  kernel_HxD = np.asarray(params["linear"]["kernel"], np.float32)
  if kernel_HxD.shape != (bert_config.hidden_size, settings.dim):
    raise ValueError(f"linear kernel has shape {kernel_HxD.shape}, expected ({bert_config.hidden_size}, "
                     f"{settings.dim}) (hidden_size, dim); check model.dim")
  return np.ascontiguousarray(kernel_HxD.T)


def _towers(params: Mapping) -> tuple[Mapping, Mapping]:
  if set(params) == {"encoder"}:
    return params["encoder"], params["encoder"]
  if set(params) == {"query_encoder", "passage_encoder"}:
    return params["query_encoder"], params["passage_encoder"]
  raise ValueError(f"DPR params must hold 'query_encoder' and 'passage_encoder', or 'encoder'; found "
                   f"{sorted(params)}")


def _length_fields(query_maxlen: int, doc_maxlen: int) -> dict[str, int]:
  """The training lengths as a bi-encoder directory records them (PyLate's key names)."""
  return {"query_length": query_maxlen, "document_length": doc_maxlen}


def _write_json(path: pathlib.Path, value: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(value, indent=2) + "\n")


def _write_st_modules(directory: pathlib.Path, after: Sequence[tuple[str, str]], max_seq_length: int,
                      model_config: Mapping[str, Any]) -> None:
  """modules.json (Transformer at the root, then the (path, type) modules `after`) and the root's ST configs."""
  modules = [("", _ST_TRANSFORMER), *after]
  _write_json(directory / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": module_type}
                                           for i, (path, module_type) in enumerate(modules)])
  for path, _ in after:
    (directory / path).mkdir(exist_ok=True)  # sentence-transformers loads each module from its directory
  _write_json(directory / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
  _write_json(directory / "config_sentence_transformers.json", dict(model_config))


def _write_sentence_transformer(directory: pathlib.Path, bert_config: BertConfig, bert_params: Mapping,
                                tokenizer_dir: PathLike, *, pooling: str, normalize: bool, max_seq_length: int,
                                lengths: Mapping[str, int]) -> None:
  """A sentence-transformers directory: BertModel at the root, then Pooling [then Normalize]; dot-product
  (cosine) similarity; the training `lengths` of both towers recorded in config_sentence_transformers.json."""
  hf_io.export_bert(directory, bert_config, bert_params, tokenizer_dir=tokenizer_dir)
  after = [("1_Pooling", _ST_POOLING)] + ([("2_Normalize", _ST_NORMALIZE)] if normalize else [])
  _write_st_modules(directory, after, max_seq_length,
                    {"similarity_fn_name": "cosine" if normalize else "dot", "prompts": {},
                     "default_prompt_name": None, **lengths})
  _write_json(directory / "1_Pooling" / "config.json", {
      "word_embedding_dimension": bert_config.hidden_size,
      "pooling_mode_cls_token": pooling == "cls",
      "pooling_mode_mean_tokens": pooling == "mean",
      "pooling_mode_max_tokens": False,
      "pooling_mode_mean_sqrt_len_tokens": False})


def _write_pylate(directory: pathlib.Path, bert_config: BertConfig, bert_params: Mapping,
                  linear_DxH: np.ndarray, tokenizer_dir: PathLike, settings: ColBERTSettings) -> None:
  """A PyLate ColBERT directory: BertModel at the root, then a bias-free Dense to `dim`."""
  hf_io.export_bert(directory, bert_config, bert_params, tokenizer_dir=tokenizer_dir)
  _write_st_modules(directory, [("1_Dense", _PYLATE_DENSE)], max(settings.query_maxlen, settings.doc_maxlen), {
      "model_type": "ColBERT",
      "similarity_fn_name": "MaxSim",
      "prompts": {},
      "default_prompt_name": None,
      "query_prefix": settings.query_token_id,
      "document_prefix": settings.doc_token_id,
      "query_length": settings.query_maxlen,
      "document_length": settings.doc_maxlen,
      "attend_to_expansion_tokens": settings.attend_to_mask_tokens,
      "skiplist_words": list(string.punctuation) if settings.mask_punctuation else [],
      "do_query_expansion": True})
  _write_json(directory / "1_Dense" / "config.json", {
      "in_features": bert_config.hidden_size, "out_features": settings.dim, "bias": False,
      "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False})
  hf_io.write_safetensors(directory / "1_Dense" / hf_io.SAFETENSORS, {"linear.weight": linear_DxH})


def _write_dpr_encoder(directory: pathlib.Path, architecture: str, bert_config: BertConfig,
                       bert_params: Mapping, tokenizer_dir: PathLike, lengths: Mapping[str, int]) -> None:
  """A `transformers` DPR encoder directory: its BertModel has no pooler and projection_dim is 0; the
  training `lengths` recorded in config.json (transformers keeps unknown config keys as attributes)."""
  no_pooler = dataclasses.replace(bert_config, add_pooling_layer=False)
  bert_params = {k: v for k, v in bert_params.items() if k != "pooler"}
  hf_io.export_bert(directory, no_pooler, bert_params, prefix=_DPR_PREFIXES[architecture],
                    config_extra={"architectures": [architecture], "model_type": "dpr", "projection_dim": 0,
                                  **lengths},
                    tokenizer_dir=tokenizer_dir)
