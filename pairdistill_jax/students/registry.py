"""The student protocol and the registry that `config.model.kind` selects from.

A student kind is one module: a `Student` subclass that says everything in which kinds differ (its Flax
module, tokenizer, loss, weight import and export, retrieval settings, FLOPs, config checks), registered with
`register`. students/colbert.py and students/dpr.py are the built-in kinds, imported when first asked for (so
this module stays in the lowest layer: config validation and the data readers ask it too); a kind defined
elsewhere (e.g. in a config file, which the CLI loads before anything else) is used once registered.
"""

from __future__ import annotations

import abc
import importlib
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import jax.numpy as jnp
import ml_collections
import numpy as np

from pairdistill_jax.errors import ConfigError

if TYPE_CHECKING:
  import flax.linen as nn
  import jax

  from pairdistill_jax.models.bert import BertConfig

Batch = Mapping[str, "jax.Array"]
BUILT_IN = ("colbert", "dpr")  # modules of this package, imported on first use


class Student(abc.ABC):
  """What a student kind provides. Its module exposes `encode_query(ids, mask)` and `encode_doc(ids, mask)`."""

  kind: ClassVar[str]  # the value of config.model.kind
  multi_vector: ClassVar[bool]  # token vectors scored by MaxSim, rather than one vector per text
  title_separator: ClassVar[str]  # what joins a passage's title and text under data.title_separator='auto'

  # ------------------------------------------------------------------------------ config and model

  def validate(self, config: ml_collections.ConfigDict, micro_batch: int) -> None:
    """Raises ConfigError for a model or loss field of this kind that cannot work."""

  @abc.abstractmethod
  def module(self, model_config: ml_collections.ConfigDict, bert_config: BertConfig, *, dtype: Any, remat: str,
             attention: str) -> nn.Module:
    """The Flax module of `config.model`."""

  @abc.abstractmethod
  def tokenizer(self, hf_tokenizer: Any, model_config: ml_collections.ConfigDict, *, query_maxlen: int,
                doc_maxlen: int) -> Any:
    """The tokenizer over `hf_tokenizer` that makes this kind's query and document tokens: like those of
    data.tokenization, it has `tokenizer`, `query_maxlen`, `doc_maxlen`, `encode_queries(texts)`,
    `encode_docs(texts, length=None)` and `score_skip_table()` (the token ids MaxSim skips, or None)."""

  @abc.abstractmethod
  def describe(self, model_config: ml_collections.ConfigDict) -> str:
    """This kind's fields of a run's settings line, e.g. ', dim 128'."""

  # -------------------------------------------------------------------------------------- training

  @abc.abstractmethod
  def loss(self, q: jax.Array, d: jax.Array, batch: Batch, config: ml_collections.ConfigDict
           ) -> tuple[jax.Array, dict]:
    """The total loss of one (micro-)batch and its metrics, from the module's query vectors `q` and document
    vectors `d` (documents flattened to [B * nway, ...])."""

  @abc.abstractmethod
  def score_group(self, config: ml_collections.ConfigDict, micro_batch: int) -> int:
    """How many queries of a micro-batch score each other's passages (1: each query only its own)."""

  def tied_random_init(self, model_config: ml_collections.ConfigDict, params: Any) -> dict:
    """Parameter subtrees that a random init copies within `params` (e.g. one tower's weights into another)."""
    return {}

  # ------------------------------------------------------------------------------ weights in and out

  @abc.abstractmethod
  def import_params(self, model_config: ml_collections.ConfigDict, directory: str, bert: dict,
                    extra: dict[str, np.ndarray]) -> dict:
    """The parameter subtrees of a student initialised from an HF / stanford directory: its BERT `bert` and
    the tensors beside it in `extra` (take what this kind uses out of it; the rest is reported unused)."""

  @abc.abstractmethod
  def export(self, directory: pathlib.Path, bert_config: BertConfig, params: Any, tokenizer_dir: str,
             model_config: ml_collections.ConfigDict) -> pathlib.Path:
    """Writes the PyTorch serving directories of a trained student into `directory` (atomically)."""

  # -------------------------------------------------------------------------------------- retrieval

  def encoder_normalizes(self, model_config: ml_collections.ConfigDict) -> bool:
    """Whether the encoder L2-normalises the module's output vectors."""
    return False

  @abc.abstractmethod
  def encoder_settings(self, module: nn.Module, tokenizer: Any, normalize: bool) -> dict[str, Any]:
    """What besides the weights changes the vectors: 'normalize' (unit length) and this kind's fields."""

  # ------------------------------------------------------------------------------------------ cost

  def head_flops(self, model_config: ml_collections.ConfigDict, length: int, sequences: int) -> float:
    """Forward FLOPs of what follows BERT in a tower, for `sequences` texts of `length` tokens."""
    return 0.0

  @abc.abstractmethod
  def scoring_flops(self, config: ml_collections.ConfigDict, micro_batch: int, group: int) -> float:
    """Forward FLOPs of the relevance scores of one global batch."""

  def synthetic_batch(self, batch: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A benchmark batch completed with what this kind's loss reads beyond the common fields."""
    return batch

  def benchmark_settings(self, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """This kind's fields that a benchmark measurement depends on."""
    return {}

  # ---------------------------------------------------------------------------------- shared helpers

  def make_module(self, model_config: ml_collections.ConfigDict, bert_config: BertConfig) -> nn.Module:
    return self.module(model_config, bert_config, dtype=jnp.dtype(model_config.dtype), remat=model_config.remat,
                       attention=model_config.attention)

  def title_separator_of(self, setting: str) -> str:
    """`data.title_separator`, or for 'auto' this kind's."""
    return self.title_separator if setting == "auto" else setting


_KINDS: dict[str, Student] = {}


def register(student: Student) -> Student:
  """Makes `student` the kind `student.kind` (a later registration of the same name replaces it)."""
  _KINDS[student.kind] = student
  return student


def kinds() -> tuple[str, ...]:
  return tuple(sorted(set(_KINDS) | set(BUILT_IN)))


def get(kind: str) -> Student:
  """The registered kind `kind` (a built-in one is imported first); a ConfigError names the known ones."""
  if kind not in _KINDS and kind in BUILT_IN:
    importlib.import_module(f"{__package__}.{kind}")
  if kind not in _KINDS:
    raise ConfigError(f"model.kind={kind!r} is not a registered student kind ({', '.join(kinds())}); a kind "
                      f"defined outside the package registers when its module (e.g. the config file) is loaded")
  return _KINDS[kind]


def title_separator(setting: str, kind: str) -> str:
  """What joins a passage's title and text: `data.title_separator`, or for 'auto' that of student `kind`."""
  return get(kind).title_separator_of(setting)


def make_student(model_config: ml_collections.ConfigDict, bert_config: BertConfig) -> nn.Module:
  """The Flax module that `config.model` describes."""
  return get(model_config.kind).make_module(model_config, bert_config)
