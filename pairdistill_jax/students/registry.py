"""The student protocol and the registry that `config.model.kind` selects from.

A student kind is one module: a `Student` subclass that says everything in which kinds differ (its Flax
module, tokenizer, loss, weight import and export, retrieval settings, FLOPs, config checks), registered with
`register`. students/colbert.py and students/dpr.py are the built-in kinds, imported by name when first asked
for (BUILT_IN_MODULES: so this module stays in a low layer, where config validation and the data readers ask
it too; tests/test_layers.py reads that table as this module's run-time imports); a kind defined elsewhere
(e.g. in a config file, which the CLI loads before anything else) is used once registered.

Retrieval knows two scoring families, which `Student.multi_vector` chooses between: one vector per text
(dot product, FAISS) or a set of vectors per text (MaxSim), whose document vectors that count are
`Student.doc_vector_mask`'s.
"""

from __future__ import annotations

import abc
import importlib
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import jax.numpy as jnp
import ml_collections
import numpy as np

from pairdistill_jax.errors import ConfigError

if TYPE_CHECKING:
  import flax.linen as nn
  import jax

  from pairdistill_jax.models.bert import BertConfig

Batch = Mapping[str, "jax.Array"]
# The built-in kinds and their modules, imported by `get` on first use (the only imports made by name).
BUILT_IN_MODULES = {"colbert": f"{__package__}.colbert", "dpr": f"{__package__}.dpr"}


@runtime_checkable
class StudentTokenizer(Protocol):
  """What a kind's tokenizer provides (data.tokenization's ColBERTTokenizer and DPRTokenizer are two).

  Token arrays are int32 numpy, one row per text, each row's mask a prefix of 1s (the stores keep lengths).
  """

  tokenizer: Any  # the HF fast tokenizer it wraps (its vocabulary keys the token stores)
  query_maxlen: int
  doc_maxlen: int

  def encode_queries(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """{'ids', 'mask'}: rows of exactly `query_maxlen` tokens."""

  def encode_docs(self, texts: Sequence[str], length: int | None = None) -> dict[str, np.ndarray]:
    """{'ids', 'mask'} and optionally 'score_mask' (the tokens MaxSim scores): rows `length` (default
    `doc_maxlen`) wide, texts truncated to `doc_maxlen` tokens."""

  def score_skip_table(self) -> np.ndarray | None:
    """A vocabulary-sized bool table of the token ids that 'score_mask' drops (pre-tokenised batches rebuild
    the score mask with it), or None when documents have no score mask."""


class Student(abc.ABC):
  """What a student kind provides. Its module exposes `encode_query(ids, mask)` and `encode_doc(ids, mask)`."""

  kind: ClassVar[str]  # the value of config.model.kind
  multi_vector: ClassVar[bool]  # a set of vectors per text scored by MaxSim, rather than one vector per text
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
                doc_maxlen: int) -> StudentTokenizer:
    """The tokenizer over `hf_tokenizer` that makes this kind's query and document tokens."""

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
  def encoder_settings(self, module: nn.Module, tokenizer: StudentTokenizer, normalize: bool) -> dict[str, Any]:
    """What besides the weights changes the vectors: 'normalize' (unit length) and this kind's fields."""

  def doc_vector_mask(self, module: nn.Module, tokens: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Which of `module`'s document vectors MaxSim scores (1) and which the corpus store drops (0), [N, V], for
    the token rows `tokens` ({'ids', 'mask'[, 'score_mask']} [N, L]) they were encoded from; None for a
    single-vector kind. The default is one vector per token: the tokenizer's score_mask, else its mask."""
    if not self.multi_vector:
      return None
    return tokens.get("score_mask", tokens["mask"])

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
  return tuple(sorted(set(_KINDS) | set(BUILT_IN_MODULES)))


def get(kind: str) -> Student:
  """The registered kind `kind` (a built-in one is imported first); a ConfigError names the known ones."""
  if kind not in _KINDS and kind in BUILT_IN_MODULES:
    importlib.import_module(BUILT_IN_MODULES[kind])
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
