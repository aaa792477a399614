"""Teachers from `config.teacher.pointwise` / `.pairwise`: local weights -> `batched_scoring.Teacher`.

  pointwise  cross_encoder  BertForSequenceClassification: 1 label -> its logit (ms-marco-MiniLM-L-6-v2);
                            2 labels -> log-softmax of label 1 (monoBERT)
             monot5         T5: log P("true") of `Query: q Document: d Relevant:` (log-softmax over true/false)
             retriever      a student: a workdir of ours, a stanford ColBERT or an HF / sentence-transformers
                            bi-encoder directory; '' = the model being mined with (config.init / the workdir);
                            its scores times `scale` (default: 20 for cosine bi-encoders, else 1)
  pairwise   duot5          T5: log P("true") of `Query: q Document0: d_i Document1: d_j Relevant:`
             duobert        BertForSequenceClassification, 2 labels: log-softmax of label 1 (d_i beats d_j)
             retriever      a retriever (as above, its own `model` and `scale`): log σ(scale · (s_i − s_j)), so
                            the pairwise teacher may be another, stronger model than the pointwise one
             pointwise      no model: log σ(t_i − t_j) of the pointwise scores (score.py)
             none           no pairs
Nothing is downloaded: `model` is a local directory (e.g. fetched with `huggingface-cli download`).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from pairdistill_jax.convert import hf_io, t5_table
from pairdistill_jax.data.tokenization import load_tokenizer
from pairdistill_jax.models.bert import COMPUTE_DTYPES
from pairdistill_jax.models.cross_encoder import CrossEncoder
from pairdistill_jax.models.t5 import T5Scorer
from pairdistill_jax.retrieval.encoders import Encoder
from pairdistill_jax.teachers import inputs
from pairdistill_jax.teachers.batched_scoring import Teacher

POINTWISE_SCORERS = ("cross_encoder", "monot5", "retriever")
PAIRWISE_SCORERS = ("duot5", "duobert", "retriever", "pointwise", "none")  # pointwise: log σ of its margins


def _model_dir(cfg: ml_collections.ConfigDict, role: str) -> pathlib.Path:
  path = pathlib.Path(cfg.model)
  if not cfg.model or not path.is_dir():
    raise FileNotFoundError(
        f"teacher.{role}.model={cfg.model!r} is not a local directory. Nothing is downloaded at run time: "
        f"fetch the teacher beforehand (e.g. `huggingface-cli download castorini/duot5-3b-msmarco --local-dir "
        f"DIR`) and pass --config.teacher.{role}.model=DIR")
  return path


def _abstract(module, *shapes: tuple[int, int]):
  """Boxed abstract parameters (with their logical axes) of `module` for int inputs of `shapes`."""
  args = [jax.ShapeDtypeStruct(s, jnp.int32) for s in shapes]
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), *args)["params"]


def cross_encoder(cfg: ml_collections.ConfigDict, role: str) -> Teacher:
  """A BERT cross-encoder: pointwise (1 label, or 2 as monoBERT) or duoBERT (2 labels)."""
  directory = _model_dir(cfg, role)
  bert_config, num_labels, params = hf_io.import_cross_encoder(directory)
  pairwise = role == "pairwise"
  if pairwise and num_labels != 2:
    raise ValueError(f"{directory}: a duoBERT teacher needs 2 labels, this classifier has {num_labels}")
  if num_labels not in (1, 2):
    raise ValueError(f"{directory}: a pointwise cross-encoder needs 1 or 2 labels, found {num_labels}")
  tokenizer = load_tokenizer(cfg.tokenizer or directory)
  module = CrossEncoder(bert_config, num_labels, dtype=jnp.dtype(cfg.dtype))

  def encode(texts: Sequence[tuple[str, ...]]):
    columns = list(zip(*texts))
    if pairwise:
      return inputs.duobert_inputs(tokenizer, *columns, max_length=cfg.max_length,
                                   type_vocab_size=bert_config.type_vocab_size)
    return inputs.cross_encoder_inputs(tokenizer, *columns, max_length=cfg.max_length)

  def apply(p, batch):
    logits_BxC = module.apply({"params": p}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return logits_BxC[:, 0] if num_labels == 1 else jax.nn.log_softmax(logits_BxC, axis=-1)[:, 1]

  shape = (1, 8)
  return Teacher(f"{'duobert' if pairwise else 'cross_encoder'}:{directory.name}", encode, apply, params,
                 _abstract(module, shape, shape, shape), {"input_ids": tokenizer.pad_token_id or 0})


def t5(cfg: ml_collections.ConfigDict, role: str) -> Teacher:
  """monoT5 (pointwise) or duoT5 (pairwise): log P("true") from one decoder step."""
  directory = _model_dir(cfg, role)
  t5_config, params = t5_table.import_t5(directory)
  tokenizer = inputs.load_t5_tokenizer(cfg.tokenizer or directory)
  module = T5Scorer(t5_config, dtype=jnp.dtype(cfg.dtype))
  builder = inputs.duot5_inputs if role == "pairwise" else inputs.monot5_inputs
  token_ids = (inputs.T5_TRUE_ID, inputs.T5_FALSE_ID)

  def encode(texts: Sequence[tuple[str, ...]]):
    return builder(tokenizer, *zip(*texts), max_length=cfg.max_length)

  def apply(p, batch):
    logits_Bx2 = module.apply({"params": p}, batch["input_ids"], batch["attention_mask"], token_ids=token_ids)
    return inputs.true_false_log_probs(logits_Bx2)[:, 0]

  shape = (1, 8)
  return Teacher(f"{'duot5' if role == 'pairwise' else 'monot5'}:{directory.name}", encode, apply, params,
                 _abstract(module, shape, shape), {"input_ids": tokenizer.pad_token_id or 0})


@dataclasses.dataclass
class RetrieverTeacher:
  """A student retriever as a teacher (scored by `teachers.retriever.RetrieverScorer`).

  Its name carries the encoder's fingerprint (weights and settings): two students at the same step differ.
  `scale` multiplies its scores into teacher logits (see `teacher_scale`).
  """

  encoder: Encoder
  scale: float

  @property
  def name(self) -> str:
    return f"retriever:{self.encoder.name}:{self.encoder.fingerprint[:12]}"


# sentence-transformers' MultipleNegativesRankingLoss scale (1 / temperature), which cosine bi-encoders such as
# all-MiniLM-L6-v2 are trained with: their softmax over cosine scores is softmax(20 * cos).
COSINE_SCALE = 20.0


def teacher_scale(cfg: ml_collections.ConfigDict, encoder: Encoder | None = None, role: str = "pointwise") -> float:
  """teacher.<role>.scale, or when 0 its default: COSINE_SCALE for a cosine retriever (scores in [-1, 1],
  whose raw softmax is nearly uniform), else 1 (cross-encoder and monoT5 logits, MaxSim sums and dot products
  are used as they are)."""
  if cfg.scale < 0:
    raise ValueError(f"teacher.{role}.scale must be > 0 (or 0 for the default), got {cfg.scale}")
  if cfg.scale:
    return float(cfg.scale)
  cosine = encoder is not None and not encoder.multi_vector and encoder.normalize
  return COSINE_SCALE if cosine else 1.0


_NEEDS_MODEL = ("cross_encoder", "duobert", "monot5", "duot5")


def check_model_dirs(teacher_cfg: ml_collections.ConfigDict) -> None:
  """Raises FileNotFoundError naming the field when a teacher's `model` directory is missing (checked before
  hours of mining and scoring)."""
  for role in ("pointwise", "pairwise"):
    cfg = teacher_cfg[role]
    if cfg.scorer in _NEEDS_MODEL or (cfg.scorer == "retriever" and cfg.model):
      _model_dir(cfg, role)


def load(cfg: ml_collections.ConfigDict, role: str,
         student: Callable[..., Encoder] | None = None) -> Teacher | RetrieverTeacher:
  """The teacher of `config.teacher.<role>`; `student(cfg, role)` builds the Encoder of a retriever teacher."""
  scorers = POINTWISE_SCORERS if role == "pointwise" else PAIRWISE_SCORERS
  if cfg.scorer not in scorers:
    raise ValueError(f"teacher.{role}.scorer must be one of {scorers}, got {cfg.scorer!r}")
  if cfg.dtype not in COMPUTE_DTYPES:
    raise ValueError(f"teacher.{role}.dtype must be one of {COMPUTE_DTYPES}, got {cfg.dtype!r}")
  if cfg.scorer in ("cross_encoder", "duobert"):
    return cross_encoder(cfg, role)
  if cfg.scorer in ("monot5", "duot5"):
    return t5(cfg, role)
  if cfg.scorer == "retriever":
    if student is None:
      raise ValueError(f"teacher.{role}.scorer='retriever' needs a student factory (run it through --mode=score)")
    encoder = student(cfg, role)
    return RetrieverTeacher(encoder, teacher_scale(cfg, encoder, role))
  raise ValueError(f"teacher.{role}.scorer={cfg.scorer!r} has no model")
