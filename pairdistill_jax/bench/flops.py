"""Analytic FLOP counts of the students: BERT's matmuls, the ColBERT projection and the relevance scores.

A matmul of [m, k] by [k, n] counts 2·m·k·n FLOPs, over padded lengths (what the hardware computes). A
train step counts 3× the forward pass: the backward pass computes, for each forward matmul, two of the
same size (the gradients of both operands). Not counted, following the model-FLOP convention of MFU:
embedding lookups (gathers), elementwise work (LayerNorm, GELU, softmax, dropout, masks, the losses over
the B×G·N score matrix, AdamW) and rematerialised recomputation. XLA's cost analysis counts the
elementwise work and the recomputation as well, so it reads a few percent higher (more for tiny hidden
sizes, up to a third more under full remat); it counts a loop body once, so it reads lower with chunked MaxSim
or gradient accumulation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections

from pairdistill_jax import students

_TRAIN_FACTOR = 3  # forward + backward (two matmuls per forward matmul)


@dataclasses.dataclass(frozen=True)
class StepFlops:
  """Forward-pass FLOPs of one train step over the global batch, by part."""

  query_encoder: float
  doc_encoder: float
  scoring: float

  @property
  def forward(self) -> float:
    return self.query_encoder + self.doc_encoder + self.scoring

  @property
  def train(self) -> float:
    """Forward and backward: the model FLOPs of the step."""
    return _TRAIN_FACTOR * self.forward


def bert_forward(bert: Mapping, length: int, sequences: int) -> float:
  """BERT's matmuls on `sequences` sequences of `length` tokens (pooler excluded: the students skip it).

  Per layer and sequence: Q, K, V and output projections 8·L·H², feed-forward 4·L·H·I, attention scores
  and weighted values 4·L²·H.
  """
  h, i = bert["hidden_size"], bert["intermediate_size"]
  per_layer = 2 * length * h * (4 * h + 2 * i) + 4 * length * length * h
  return float(sequences) * bert["num_hidden_layers"] * per_layer


def encoder_forward(model_cfg: ml_collections.ConfigDict, length: int, sequences: int) -> float:
  """A student tower: BERT plus what its kind puts after it (ColBERT: the H -> dim projection of every token)."""
  head = students.get(model_cfg.kind).head_flops(model_cfg, length, sequences)
  return bert_forward(model_cfg.bert, length, sequences) + head


def train_step(config: ml_collections.ConfigDict) -> StepFlops:
  """The forward FLOPs of one step of `config` (all micro-batches of the global batch together): the towers,
  and the relevance scores of the kind (e.g. MaxSim of every query against its group's passages)."""
  model_cfg, batch, nway = config.model, config.train.batch_size, config.data.nway
  student = students.get(model_cfg.kind)
  micro = batch // config.train.grad_accum
  return StepFlops(
      query_encoder=encoder_forward(model_cfg, model_cfg.query_maxlen, batch),
      doc_encoder=encoder_forward(model_cfg, model_cfg.doc_maxlen, batch * nway),
      scoring=student.scoring_flops(config, micro, student.score_group(config, micro)))
