"""The DPR student (bi-encoder): query and passage BERT towers (or one shared tower) pooled to one vector each,
scored by dot product (cosine when `model.normalize`, as sentence-transformers models with a Normalize module).

Its export writes `query_encoder/` and `passage_encoder/`, sentence-transformers directories (the model's
pooling, dot or cosine similarity), and for unnormalised [CLS] pooling `dpr_question_encoder/` and
`dpr_context_encoder/`, `transformers` DPRQuestionEncoder / DPRContextEncoder directories (that is all those
classes compute). Every directory records the training lengths.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pairdistill_jax import io, losses
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.convert import export, hf_io
from pairdistill_jax.data.tokenization import DPRTokenizer
from pairdistill_jax.models import scoring
from pairdistill_jax.models.bert import BertConfig, BertEncoder
from pairdistill_jax.students.registry import Student, register

QUERY_ST_DIR = "query_encoder"
PASSAGE_ST_DIR = "passage_encoder"
DPR_QUESTION_DIR = "dpr_question_encoder"
DPR_CONTEXT_DIR = "dpr_context_encoder"
_DPR_PREFIXES = {"DPRQuestionEncoder": "question_encoder.bert_model.",
                 "DPRContextEncoder": "ctx_encoder.bert_model."}

_log = logging.getLogger(__name__)


def pool(hidden_BxLxH: jax.Array, mask_BxL: jax.Array, pooling: str) -> jax.Array:
  """[CLS] vector or the attention-masked mean of the token vectors (sentence-transformers), float32."""
  hidden_BxLxH = hidden_BxLxH.astype(jnp.float32)
  if pooling == "cls":
    return hidden_BxLxH[:, 0]
  weights_BxLx1 = mask_BxL[..., None].astype(jnp.float32)
  return (hidden_BxLxH * weights_BxLx1).sum(1) / jnp.maximum(weights_BxLx1.sum(1), 1e-9)


class DPR(nn.Module):
  """Query and passage BERT towers (or one shared tower) pooled to one vector each (L2-normalised when
  `normalize`, as sentence-transformers bi-encoders with a Normalize module: the dot product is the cosine)."""

  bert_config: BertConfig
  pooling: str = "cls"
  shared_towers: bool = False
  normalize: bool = False
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  def setup(self):
    def make():
      return BertEncoder(self.bert_config, dtype=self.dtype, remat=self.remat, attention=self.attention)

    if self.shared_towers:
      self.encoder = make()
    else:
      self.query_encoder = make()
      self.passage_encoder = make()

  def _tower(self, which):
    return self.encoder if self.shared_towers else getattr(self, f"{which}_encoder")

  def pool(self, hidden_BxLxH: jax.Array, mask_BxL: jax.Array) -> jax.Array:
    return pool(hidden_BxLxH, mask_BxL, self.pooling)

  def _encode(self, which, ids_BxL, mask_BxL, deterministic):
    hidden_BxLxH, _ = self._tower(which)(ids_BxL, mask_BxL, deterministic=deterministic)
    pooled_BxH = self.pool(hidden_BxLxH, mask_BxL)
    return scoring.l2_normalize(pooled_BxH) if self.normalize else pooled_BxH

  def encode_query(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    return self._encode("query", ids_BxL, mask_BxL, deterministic)

  def encode_doc(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    return self._encode("passage", ids_BxL, mask_BxL, deterministic)

  def __call__(self, q_ids, q_mask, d_ids, d_mask, *, deterministic: bool = True):
    """Used by `init` only: touches every parameter."""
    return (self.encode_query(q_ids, q_mask, deterministic=deterministic),
            self.encode_doc(d_ids, d_mask, deterministic=deterministic))


def towers(params: Mapping) -> tuple[Mapping, Mapping]:
  """(query tower, passage tower) parameters of a DPR tree (the same tree twice when shared)."""
  if set(params) == {"encoder"}:
    return params["encoder"], params["encoder"]
  if set(params) == {"query_encoder", "passage_encoder"}:
    return params["query_encoder"], params["passage_encoder"]
  raise ValueError(f"DPR params must hold 'query_encoder' and 'passage_encoder', or 'encoder'; found "
                   f"{sorted(params)}")


def export_dpr(directory: export.PathLike, bert_config: BertConfig, params: Mapping, tokenizer_dir: export.PathLike,
               *, pooling: str, query_maxlen: int, doc_maxlen: int, normalize: bool = False) -> pathlib.Path:
  """Writes the sentence-transformers and (for [CLS] pooling) `transformers` DPR directories; returns DIRECTORY.

  A `normalize`d student's sentence-transformers directories end in a Normalize module. `pooling` is 'cls',
  'mean' or 'max' (sentence-transformers' Pooling modes). `params` is the DPR tree: {'query_encoder': ...,
  'passage_encoder': ...} or {'encoder': ...} (shared).
  """
  if pooling not in export.ST_POOLING_MODES:
    raise ValueError(f"pooling must be one of {sorted(export.ST_POOLING_MODES)}, got {pooling!r}")
  query_params, passage_params = towers(nn.meta.unbox(params))
  with io.atomic_directory(pathlib.Path(directory)) as tmp:
    lengths = export.length_fields(query_maxlen, doc_maxlen)
    export.write_sentence_transformer(tmp / QUERY_ST_DIR, bert_config, query_params, tokenizer_dir,
                                      pooling=pooling, normalize=normalize, max_seq_length=query_maxlen,
                                      lengths=lengths)
    export.write_sentence_transformer(tmp / PASSAGE_ST_DIR, bert_config, passage_params, tokenizer_dir,
                                      pooling=pooling, normalize=normalize, max_seq_length=doc_maxlen,
                                      lengths=lengths)
    if pooling == "cls" and not normalize:
      _write_dpr_encoder(tmp / DPR_QUESTION_DIR, "DPRQuestionEncoder", bert_config, query_params, tokenizer_dir,
                         lengths)
      _write_dpr_encoder(tmp / DPR_CONTEXT_DIR, "DPRContextEncoder", bert_config, passage_params,
                         tokenizer_dir, lengths)
    else:
      _log.warning("%s DPR: exported as sentence-transformers only (transformers' DPR encoders return the "
                   "unnormalised [CLS] vector, which is not this model's embedding).",
                   "Normalised" if normalize else f"{pooling.capitalize()}-pooled")
  return pathlib.Path(directory)


def _write_dpr_encoder(directory: pathlib.Path, architecture: str, bert_config: BertConfig,
                       bert_params: Mapping, tokenizer_dir: export.PathLike, lengths: Mapping[str, int]) -> None:
  """A `transformers` DPR encoder directory: its BertModel has no pooler and projection_dim is 0; the
  training `lengths` recorded in config.json (transformers keeps unknown config keys as attributes)."""
  no_pooler = dataclasses.replace(bert_config, add_pooling_layer=False)
  bert_params = {k: v for k, v in bert_params.items() if k != "pooler"}
  hf_io.export_bert(directory, no_pooler, bert_params, prefix=_DPR_PREFIXES[architecture],
                    config_extra={"architectures": [architecture], "model_type": "dpr", "projection_dim": 0,
                                  **lengths},
                    tokenizer_dir=tokenizer_dir)


def _check_pooling(model_config: ml_collections.ConfigDict, directory: str) -> None:
  """A sentence-transformers directory says how it pools: a student that pools otherwise is refused (its
  vectors would not be the model's); a Normalize module the student lacks (model.normalize) is a warning."""
  layout = hf_io.read_st_layout(pathlib.Path(directory))
  if layout.pooling not in (None, model_config.pooling):
    raise ConfigError(
        f"model.pooling={model_config.pooling!r} but {directory} pools with {layout.pooling!r} "
        f"(its sentence-transformers Pooling config): set --config.model.pooling={layout.pooling}")
  if layout.normalize and not model_config.normalize:
    _log.warning("%s L2-normalises its vectors; the DPR student scores unnormalised dot products (set "
                 "--config.model.normalize=True for its cosine)", directory)


class DPRStudent(Student):
  kind = "dpr"
  multi_vector = False
  title_separator = " "  # BERT's and sentence-transformers' `title text`
  poolings = ("cls", "mean")

  def validate(self, config, micro_batch):
    if config.model.pooling not in self.poolings:
      raise ConfigError(f"model.pooling must be {' or '.join(map(repr, self.poolings))}, got "
                        f"{config.model.pooling!r}")
    workers = config.loss.dpr_workers
    if not (workers >= 0 and micro_batch % max(workers, 1) == 0):
      raise ConfigError(f"loss.dpr_workers={workers} must be >= 0 and divide the micro-batch {micro_batch} "
                        f"(0: the exact gradient of the global loss)")

  def module(self, model_config, bert_config, *, dtype, remat, attention):
    return DPR(bert_config, pooling=model_config.pooling, shared_towers=model_config.shared_towers,
               normalize=model_config.normalize, dtype=dtype, remat=remat, attention=attention)

  def tokenizer(self, hf_tokenizer, model_config, *, query_maxlen, doc_maxlen):
    return DPRTokenizer(hf_tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)

  def describe(self, model_config):
    return (f", {model_config.pooling} pooling{', normalised' if model_config.normalize else ''}, shared towers "
            f"{model_config.shared_towers}")

  def score_group(self, config, micro_batch):
    """Every query scores every passage of its micro-batch (the global KL's in-batch passages)."""
    return micro_batch

  def loss(self, q, d, batch, config):
    loss_cfg = config.loss
    batch_size, nway, _ = batch["d_ids"].shape
    d_BxNxD = d.reshape(batch_size, nway, -1)
    scores_BxBN = scoring.grouped_scores(scoring.dot, q, d_BxNxD, group_size=batch_size)
    return losses.dpr_loss(scores_BxBN, batch, temperature=loss_cfg.temperature, pair_alpha=loss_cfg.pair_alpha,
                           workers=loss_cfg.dpr_workers, kd_weight=loss_cfg.kd_weight, in_batch=loss_cfg.in_batch)

  def tied_random_init(self, model_config, params):
    """Separate towers start from the same weights, as from a pretrained init."""
    if model_config.shared_towers:
      return {}
    return {"passage_encoder": jax.tree.map(np.asarray, params["query_encoder"])}

  def import_params(self, model_config, directory, bert, extra):
    _check_pooling(model_config, directory)
    names = ("encoder",) if model_config.shared_towers else ("query_encoder", "passage_encoder")
    _log.info("Initialised DPR towers %s from %s", names, directory)
    return {name: bert for name in names}

  def export(self, directory, bert_config, params, tokenizer_dir, model_config):
    return export_dpr(directory, bert_config, params, tokenizer_dir, pooling=model_config.pooling,
                      query_maxlen=model_config.query_maxlen, doc_maxlen=model_config.doc_maxlen,
                      normalize=model_config.normalize)

  def encoder_normalizes(self, model_config):
    return model_config.normalize

  def encoder_settings(self, module, tokenizer, normalize):
    return {"normalize": normalize, "pooling": module.pooling}

  def scoring_flops(self, config, micro_batch, group):
    """Dot products of every query against every passage of its micro-batch."""
    return 2.0 * config.train.batch_size * micro_batch * config.data.nway * config.model.bert["hidden_size"]


register(DPRStudent())
