"""Corpus embeddings on disk: encoded in chunks (resumable, split over hosts and devices), read back as stores.

  DIR/manifest.json               what the chunks were computed from (model fingerprint, corpus hash, sizes,
                                  vector dtype)
  DIR/chunk_000000.vectors.npy    DPR: one vector per document; ColBERT: the scored token vectors (padding and
                                  punctuation dropped, as stanford ColBERT indexes them) of the chunk's
                                  documents, concatenated; in the store's vector dtype
  DIR/chunk_000000.lengths.npy    ColBERT: tokens per document, int32

The vector dtype is float32 (the encoder's output, exactly) or float16 (half the disk and memory, for big
collections; it moves the scores by about 1e-3, enough to move nDCG@10 in the third decimal).

The directory is an `io.ChunkDir`: every file is written atomically, and a chunk counts as done once its last
file exists (lengths for ColBERT, vectors for DPR), so a crashed run resumes at the first missing chunk. Chunks
of a different model, corpus or vector dtype (manifest mismatch) are refused unless the caller passes
`rebuild=True` (evaluation and mining do: a workdir's corpus directory is re-encoded after more training), which
deletes them and logs why. Chunk i is encoded by process i mod P.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm

from pairdistill_jax import distributed, io, remote, students
from pairdistill_jax.retrieval import devices
from pairdistill_jax.retrieval.encoders import Encoder

VECTOR_DTYPES = ("float32", "float16")
_VECTORS = "chunk_{:06d}.vectors.npy"
_LENGTHS = "chunk_{:06d}.lengths.npy"

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class DenseStore:
  """One vector per document (bi-encoders), in chunks of consecutive documents."""

  chunks: list[np.ndarray]

  @property
  def num_docs(self) -> int:
    return sum(c.shape[0] for c in self.chunks)

  @property
  def dim(self) -> int:
    return self.chunks[0].shape[1]

  def sample(self, n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct documents' vectors (all of them when n >= num_docs), float32."""
    return _sample_rows(self.chunks, n, seed)

  def gather(self, doc_ids_C: np.ndarray) -> np.ndarray:
    """The documents' vectors [C, dim], float32, in the order given."""
    return _gather_rows(self.chunks, np.asarray(doc_ids_C, np.int64))


@dataclasses.dataclass
class EmbeddingStore:
  """ColBERT document token vectors: `chunks[c]` holds documents [c*chunk_size, (c+1)*chunk_size)."""

  chunks: list[np.ndarray]
  lengths: np.ndarray
  chunk_size: int
  _starts: np.ndarray = dataclasses.field(init=False, repr=False)

  def __post_init__(self) -> None:
    self.lengths = np.asarray(self.lengths, np.int64)
    self._starts = np.zeros_like(self.lengths)
    for c, vectors in enumerate(self.chunks):
      lengths = self.lengths[c * self.chunk_size:(c + 1) * self.chunk_size]
      if lengths.sum() != vectors.shape[0]:
        raise ValueError(f"chunk {c}: lengths sum to {lengths.sum()} tokens but it holds {vectors.shape[0]}")
      self._starts[c * self.chunk_size:(c + 1) * self.chunk_size] = np.cumsum(lengths) - lengths
    if len(self.chunks) != -(-len(self.lengths) // self.chunk_size):
      raise ValueError(f"{len(self.chunks)} chunks for {len(self.lengths)} documents of chunk_size "
                       f"{self.chunk_size}")

  @property
  def num_docs(self) -> int:
    return len(self.lengths)

  @property
  def num_tokens(self) -> int:
    return int(self.lengths.sum())

  @property
  def dim(self) -> int:
    return self.chunks[0].shape[1]

  @property
  def max_length(self) -> int:
    return int(self.lengths.max())

  def doc_of_token(self) -> np.ndarray:
    """The document index of every token, in storage order (the order tokens are added to an index)."""
    return np.repeat(np.arange(self.num_docs), self.lengths)

  def sample(self, n: int, seed: int = 0) -> np.ndarray:
    """`n` distinct token vectors (all of them when n >= num_tokens), float32."""
    return _sample_rows(self.chunks, n, seed)

  def gather(self, doc_ids_C: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The documents' token vectors padded to `width`: ([C, width, dim], mask [C, width] int32)."""
    doc_ids_C = np.asarray(doc_ids_C, np.int64)
    lengths_C = self.lengths[doc_ids_C]
    if lengths_C.size and lengths_C.max() > width:
      raise ValueError(f"width {width} is below a gathered document's {lengths_C.max()} tokens")
    offsets_W = np.arange(width)
    mask_CxW = offsets_W[None] < lengths_C[:, None]
    positions_CxW = self._starts[doc_ids_C][:, None] + np.minimum(offsets_W[None], lengths_C[:, None] - 1)
    vectors_CxWxD = np.empty((len(doc_ids_C), width, self.dim), self.chunks[0].dtype)
    chunk_C = doc_ids_C // self.chunk_size
    for c in np.unique(chunk_C):
      rows = chunk_C == c
      vectors_CxWxD[rows] = self.chunks[c][positions_CxW[rows]]
    return vectors_CxWxD, mask_CxW.astype(np.int32)


Store = DenseStore | EmbeddingStore


def _gather_rows(chunks: Sequence[np.ndarray], rows: np.ndarray) -> np.ndarray:
  """Rows `rows` (indices into the chunks laid end to end, any order) as one float32 array."""
  sizes = np.array([c.shape[0] for c in chunks])
  ends = np.cumsum(sizes)
  chunk_of = np.searchsorted(ends, rows, side="right")
  starts = ends - sizes
  out = np.empty((len(rows), chunks[0].shape[1]), np.float32)
  for c in np.unique(chunk_of):
    at = chunk_of == c
    out[at] = chunks[c][rows[at] - starts[c]]
  return out


def _sample_rows(chunks: Sequence[np.ndarray], n: int, seed: int) -> np.ndarray:
  total = sum(c.shape[0] for c in chunks)
  return _gather_rows(chunks, np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False)))


def corpus_hash(texts: Sequence[str]) -> str:
  """A digest of the documents' texts in order."""
  digest = hashlib.blake2b(digest_size=16)
  for text in texts:
    data = text.encode("utf-8")
    digest.update(len(data).to_bytes(8, "little"))
    digest.update(data)
  return digest.hexdigest()


def _done_name(kind: str) -> str:
  """The file written last for a chunk of student `kind`: its lengths (multi-vector) or its vectors."""
  return _LENGTHS if students.get(kind).multi_vector else _VECTORS


def encode_chunk(encoder: Encoder, texts: Sequence[str], batch_size: int,
                 on_batch: Callable[[int], object] = lambda n: None) -> tuple[np.ndarray, np.ndarray | None]:
  """(vectors, lengths) of documents, float32: single-vector (DPR) [n, dim] and None; multi-vector (ColBERT)
  the scored vectors (the kind's `doc_vector_mask`: for ColBERT its scored tokens) and their counts.

  Documents are encoded longest first in batches of `batch_size` rows, each cut to a bucketed width;
  `on_batch(rows)` follows each batch.
  """
  tokens = encoder.tokenizer.encode_docs(list(texts))
  ids_NxL, mask_NxL = tokens["ids"], tokens["mask"]
  order = np.argsort(-mask_NxL.sum(1), kind="stable")
  per_doc: list[np.ndarray | None] = [None] * len(texts)
  for start in range(0, len(texts), batch_size):
    rows = order[start:start + batch_size]
    width = devices.width_bucket(int(mask_NxL[rows].sum(1).max()), ids_NxL.shape[1])
    vectors = encoder.encode("doc", devices.pad_rows(ids_NxL[rows, :width], batch_size),
                             devices.pad_rows(mask_NxL[rows, :width], batch_size))[:len(rows)]
    keep_BxV = encoder.doc_vector_mask({name: array[rows, :width] for name, array in tokens.items()})
    for i, row in enumerate(rows):
      per_doc[row] = vectors[i] if keep_BxV is None else vectors[i][np.asarray(keep_BxV[i], bool)]
    on_batch(len(rows))
  if not encoder.multi_vector:
    return np.stack(per_doc).astype(np.float32), None
  lengths = np.array([len(v) for v in per_doc], np.int32)
  return np.concatenate(per_doc).astype(np.float32, copy=False), lengths


def encode_corpus(encoder: Encoder, texts: Sequence[str], directory: str | os.PathLike, *,
                  batch_size: int = 256, chunk_size: int = 16_384, vector_dtype: str = "float32",
                  rebuild: bool = False) -> Store:
  """Encodes (or resumes encoding) the documents into `directory`, storing the vectors as `vector_dtype`
  (float32 | float16); returns the store over all of them. Chunks of another model, corpus or settings there
  are a ValueError, or with `rebuild` deleted (logged with the fields that differ)."""
  if vector_dtype not in VECTOR_DTYPES:
    raise ValueError(f"vector_dtype must be one of {VECTOR_DTYPES}, got {vector_dtype!r}")
  directory = pathlib.Path(directory)
  if jax.process_count() > 1 and remote.find(directory) is not None:
    raise ValueError(f"{directory} lies in this host's mirror of a bucket workdir, which the other hosts do "
                     f"not see: give the corpus embeddings a directory every host shares (eval.corpus_dir, "
                     f"mine.corpus_dir)")
  directory.mkdir(parents=True, exist_ok=True)
  remote.mark_not_mirrored(directory)  # a cache: never pushed to a bucket workdir
  if not texts:
    raise ValueError("the collection is empty")
  batch_size = devices.round_up(batch_size, encoder.mesh.size)
  manifest = {"fingerprint": encoder.fingerprint, "corpus": corpus_hash(texts), "num_docs": len(texts),
              "chunk_size": chunk_size, "kind": encoder.kind, "vector_dtype": vector_dtype}
  chunk_dir = io.ChunkDir(directory, manifest, chunk_glob="chunk_*.npy", done_name=_done_name(encoder.kind),
                          remedy="give the corpus embeddings another directory")
  chunk_dir.open(rebuild=rebuild)
  n_chunks = -(-len(texts) // chunk_size)
  done = chunk_dir.done(n_chunks)
  chunks = range(jax.process_index(), n_chunks, jax.process_count())
  mine = sum(len(texts[c * chunk_size:(c + 1) * chunk_size]) for c in chunks)
  todo = [c for c in chunks if not done[c]]
  encoded = mine - sum(len(texts[c * chunk_size:(c + 1) * chunk_size]) for c in todo)
  if encoded:
    _log.info("%s: resuming, %d of this host's %d documents already encoded", directory, encoded, mine)
  with tqdm.tqdm(total=mine, initial=encoded, desc="encode corpus", unit="doc", dynamic_ncols=True,
                 disable=jax.process_index() != 0) as bar:
    for c in todo:
      chunk_texts = texts[c * chunk_size:(c + 1) * chunk_size]
      vectors, lengths = encode_chunk(encoder, chunk_texts, batch_size, bar.update)
      io.save_npy(chunk_dir.path(_VECTORS, c), vectors.astype(vector_dtype, copy=False))
      if lengths is not None:
        io.save_npy(chunk_dir.path(_LENGTHS, c), lengths)
  distributed.barrier("retrieval-corpus-encoded")
  return open_embeddings(directory)


def open_embeddings(directory: str | os.PathLike) -> Store:
  """The store of a completely encoded directory (vectors memory-mapped)."""
  directory = pathlib.Path(directory)
  manifest = io.read_json(directory / io.MANIFEST)
  if not isinstance(manifest, dict):
    raise FileNotFoundError(f"{directory} holds no readable {io.MANIFEST}; encode the corpus there first")
  n_chunks = -(-manifest["num_docs"] // manifest["chunk_size"])
  done_name = _done_name(manifest["kind"])
  missing = [c for c in range(n_chunks) if not (directory / done_name.format(c)).exists()]
  if missing:
    raise FileNotFoundError(f"{directory}: chunks {missing[:5]}{'...' if len(missing) > 5 else ''} are missing; "
                            f"run the encoding again to complete them")
  vectors = [np.load(directory / _VECTORS.format(c), mmap_mode="r") for c in range(n_chunks)]
  if not students.get(manifest["kind"]).multi_vector:
    return DenseStore(vectors)
  lengths = np.concatenate([np.load(directory / _LENGTHS.format(c)) for c in range(n_chunks)])
  return EmbeddingStore(vectors, lengths, manifest["chunk_size"])
