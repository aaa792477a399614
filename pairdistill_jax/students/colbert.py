"""The ColBERT student (late interaction): BERT -> linear H->dim without bias -> L2-normalised token vectors,
scored by MaxSim, as stanford ColBERTv2.

Its export writes DIRECTORY/colbert, a stanford ColBERT checkpoint (HF_ColBERT: `bert.*` + `linear.weight`,
config.json, tokenizer files, artifact.metadata with the model fields) that stanford `colbert-ai` and PyLate
load, and DIRECTORY/pylate, the same weights as a PyLate-native sentence-transformers directory (prefixes
`[unused0]`/`[unused1]`, so no tokens are added to the vocabulary). Both record the training lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pathlib
import string
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pairdistill_jax import io, losses
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.convert import export, hf_io
from pairdistill_jax.data.formats import COLBERT_TITLE_SEPARATOR
from pairdistill_jax.data.tokenization import ColBERTTokenizer
from pairdistill_jax.models import scoring
from pairdistill_jax.models.bert import BertConfig, BertEncoder
from pairdistill_jax.students.registry import Student, register

COLBERT_DIR = "colbert"
PYLATE_DIR = "pylate"
_PYLATE_DENSE = "pylate.models.Dense.Dense"

_log = logging.getLogger(__name__)


class ColBERT(nn.Module):
  """BERT -> linear H->dim without bias -> L2-normalised token vectors (stanford ColBERTv2)."""

  bert_config: BertConfig
  dim: int = 128
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  def setup(self):
    self.bert = BertEncoder(self.bert_config, dtype=self.dtype, remat=self.remat, attention=self.attention)
    self.linear = nn.Dense(
        self.dim, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)))

  def _encode(self, ids_BxL, mask_BxL, deterministic):
    hidden_BxLxH, _ = self.bert(ids_BxL, mask_BxL, deterministic=deterministic)
    return scoring.l2_normalize(self.linear(hidden_BxLxH))

  def encode_query(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    """All query_maxlen vectors, [MASK] augmentation included (they are scored)."""
    return self._encode(ids_BxL, mask_BxL, deterministic)

  def encode_doc(self, ids_BxL, mask_BxL, *, deterministic: bool = True) -> jax.Array:
    """Token vectors; which of them count in MaxSim is the tokenizer's score_mask."""
    return self._encode(ids_BxL, mask_BxL, deterministic)

  def __call__(self, q_ids, q_mask, d_ids, d_mask, *, deterministic: bool = True):
    """Used by `init` only: touches every parameter."""
    return (self.encode_query(q_ids, q_mask, deterministic=deterministic),
            self.encode_doc(d_ids, d_mask, deterministic=deterministic))


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


def export_colbert(directory: export.PathLike, bert_config: BertConfig, params: Mapping,
                   tokenizer_dir: export.PathLike, settings: ColBERTSettings, *, pylate: bool = True) -> pathlib.Path:
  """Writes DIRECTORY/colbert (stanford) and, with `pylate`, DIRECTORY/pylate; returns DIRECTORY.

  `params` is the ColBERT tree {'bert': ..., 'linear': {'kernel': [H, dim]}} (boxed or plain).
  """
  params = nn.meta.unbox(params)
  linear_DxH = _linear_weight(params, bert_config, settings)
  with io.atomic_directory(pathlib.Path(directory)) as tmp:
    hf_io.export_bert(tmp / COLBERT_DIR, bert_config, params["bert"], prefix="bert.",
                      extra_tensors={"linear.weight": linear_DxH},
                      config_extra={"architectures": ["HF_ColBERT"]}, tokenizer_dir=tokenizer_dir)
    export.write_json(tmp / COLBERT_DIR / hf_io.COLBERT_METADATA, settings.artifact_metadata())
    if pylate:
      _write_pylate(tmp / PYLATE_DIR, bert_config, params["bert"], linear_DxH, tokenizer_dir, settings)
  return pathlib.Path(directory)


def _linear_weight(params: Mapping, bert_config: BertConfig, settings: ColBERTSettings) -> np.ndarray:
  """The ColBERT projection as a PyTorch Linear weight [dim, H]."""
  if set(params) != {"bert", "linear"}:
    raise ValueError(f"ColBERT params must hold exactly 'bert' and 'linear', found {sorted(params)}")
  kernel_HxD = np.asarray(params["linear"]["kernel"], np.float32)
  if kernel_HxD.shape != (bert_config.hidden_size, settings.dim):
    raise ValueError(f"linear kernel has shape {kernel_HxD.shape}, expected ({bert_config.hidden_size}, "
                     f"{settings.dim}) (hidden_size, dim); check model.dim")
  return np.ascontiguousarray(kernel_HxD.T)


def _write_pylate(directory: pathlib.Path, bert_config: BertConfig, bert_params: Mapping,
                  linear_DxH: np.ndarray, tokenizer_dir: export.PathLike, settings: ColBERTSettings) -> None:
  """A PyLate ColBERT directory: BertModel at the root, then a bias-free Dense to `dim`."""
  hf_io.export_bert(directory, bert_config, bert_params, tokenizer_dir=tokenizer_dir)
  export.write_st_modules(directory, [("1_Dense", _PYLATE_DENSE)], max(settings.query_maxlen, settings.doc_maxlen), {
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
  export.write_json(directory / "1_Dense" / "config.json", {
      "in_features": bert_config.hidden_size, "out_features": settings.dim, "bias": False,
      "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False})
  hf_io.write_safetensors(directory / "1_Dense" / hf_io.SAFETENSORS, {"linear.weight": linear_DxH})


class ColBERTStudent(Student):
  kind = "colbert"
  multi_vector = True
  title_separator = COLBERT_TITLE_SEPARATOR

  def validate(self, config, micro_batch):
    loss = config.loss
    group = self.score_group(config, micro_batch)
    if not (group >= 1 and micro_batch % group == 0):
      raise ConfigError(f"loss.in_batch_group={loss.in_batch_group} must divide the micro-batch {micro_batch} "
                        f"(or be -1 for the whole micro-batch)")
    if loss.maxsim_chunk < 0:
      raise ConfigError(f"loss.maxsim_chunk must be >= 0 (0: unchunked), got {loss.maxsim_chunk}")

  def module(self, model_config, bert_config, *, dtype, remat, attention):
    return ColBERT(bert_config, dim=model_config.dim, dtype=dtype, remat=remat, attention=attention)

  def tokenizer(self, hf_tokenizer, model_config, *, query_maxlen, doc_maxlen):
    return ColBERTTokenizer(hf_tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen,
                            mask_punctuation=model_config.mask_punctuation,
                            attend_to_mask_tokens=model_config.attend_to_mask_tokens)

  def describe(self, model_config):
    return f", dim {model_config.dim}"

  def score_group(self, config, micro_batch):
    """loss.in_batch_group (-1: the whole micro-batch) with in-batch negatives, else 1."""
    if not config.loss.in_batch:
      return 1
    return micro_batch if config.loss.in_batch_group == -1 else config.loss.in_batch_group

  def loss(self, q, d, batch, config):
    loss_cfg = config.loss
    batch_size, nway, doc_len = batch["d_ids"].shape
    d_BxNxLdxD = d.reshape(batch_size, nway, doc_len, -1)
    group = self.score_group(config, batch_size)
    maxsim = functools.partial(scoring.maxsim, chunk=loss_cfg.maxsim_chunk)
    scores_BxGN = scoring.grouped_scores(maxsim, q, d_BxNxLdxD, batch["d_score_mask"], group_size=group)
    scores_BxN = scoring.own_block(scores_BxGN, nway, group)
    return losses.colbert_loss(scores_BxN, scores_BxGN if loss_cfg.in_batch else None, batch,
                               temperature=loss_cfg.temperature, pair_alpha=loss_cfg.pair_alpha,
                               in_batch_group=group, kd_weight=loss_cfg.kd_weight)

  def import_params(self, model_config, directory, bert, extra):
    params = {"bert": bert}
    if "linear.weight" in extra:  # a stanford ColBERT checkpoint
      params["linear"] = {"kernel": extra.pop("linear.weight").T}
      dim = params["linear"]["kernel"].shape[1]
      if dim != model_config.dim:
        raise ConfigError(f"{directory} projects to dim {dim} but model.dim={model_config.dim}: set "
                          f"--config.model.dim={dim}")
    _log.info("Initialised ColBERT %s from %s", " and ".join(params), directory)
    return params

  def export(self, directory, bert_config, params, tokenizer_dir, model_config):
    return export_colbert(directory, bert_config, params, tokenizer_dir,
                          ColBERTSettings.from_model_config(model_config))

  def encoder_settings(self, module, tokenizer, normalize):
    return {"normalize": True, "query_token": tokenizer.query_token, "doc_token": tokenizer.doc_token,
            "mask_punctuation": tokenizer.mask_punctuation, "attend_to_mask_tokens": tokenizer.attend_to_mask_tokens}

  def head_flops(self, model_config, length, sequences):
    """The H -> dim projection of every token."""
    return 2.0 * sequences * length * model_config.bert["hidden_size"] * model_config.dim

  def scoring_flops(self, config, micro_batch, group):
    """MaxSim of every query against its group's passages."""
    model_cfg = config.model
    pairs_scored = config.train.batch_size * group * config.data.nway
    return 2.0 * pairs_scored * model_cfg.query_maxlen * model_cfg.doc_maxlen * model_cfg.dim

  def synthetic_batch(self, batch, rng):
    return dict(batch, d_score_mask=batch["d_mask"] * (rng.random(batch["d_mask"].shape) < 0.9))

  def benchmark_settings(self, config):
    return {"maxsim_chunk": config.loss.maxsim_chunk, "in_batch_group": config.loss.in_batch_group}


register(ColBERTStudent())
