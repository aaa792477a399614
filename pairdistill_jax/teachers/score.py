"""--mode=score: teacher scores for a run, written as PairDistill training lines (docs/design.md §2.3, §2.6).

For each query of the run (in the run's order): the pointwise teacher scores its top `top_n` passages; the
best `nway` by that score (ties: run order) become the line's entries; pairs are selected among its top
`topk` (`pairs.select_pairs`) and scored by the pairwise teacher (log P(entry i beats entry j), i ranked
higher; a retriever as the pairwise teacher: log σ of its own scaled margins). Queries are processed
`chunk_queries` at a time; each finished chunk is written to OUTPUT.chunks/NNNNNN.jsonl, so a crash loses at
most the chunk in progress and a rerun with the same settings carries on. The chunks are joined into OUTPUT at
the end. Every process computes; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import time
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tqdm

from pairdistill_jax import config_lib, distributed, io, paths, sharding
from pairdistill_jax.data import array_cache, formats
from pairdistill_jax.retrieval import metrics
from pairdistill_jax.teachers import load, mining, pairs
from pairdistill_jax.teachers.retriever import RetrieverScorer
from pairdistill_jax.teachers.batched_scoring import ShardedScorer, Teacher, teacher_mesh

CHUNKS_SUFFIX = ".chunks"
CHUNK_NAME = "{:06d}.jsonl"  # OUTPUT.chunks/CHUNK_NAME: the training lines of one chunk of queries
# a retriever teacher's collection vectors, beside the output (role: pointwise, pairwise)
TEACHER_CORPUS_DIRS = {"pointwise": "teacher_corpus", "pairwise": "pairwise_teacher_corpus"}

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class Scored:
  path: pathlib.Path
  num_queries: int
  num_pairs: int
  seconds: float
  passages_per_second: float
  pairs_per_second: float
  skipped: bool = False


def check_teacher_config(teacher_cfg: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the `teacher.*` field to change."""
  for field in ("top_n", "nway", "topk", "max_distance", "chunk_queries", "bucket_multiple"):
    if teacher_cfg[field] < 1:
      raise config_lib.ConfigError(f"teacher.{field} must be >= 1, got {teacher_cfg[field]}")
  if teacher_cfg.n_pairs < 0:
    raise config_lib.ConfigError(f"teacher.n_pairs must be >= 0, got {teacher_cfg.n_pairs}")
  if teacher_cfg.nway > teacher_cfg.top_n:
    raise config_lib.ConfigError(f"teacher.nway={teacher_cfg.nway} exceeds teacher.top_n={teacher_cfg.top_n}: the "
                                 f"lines keep the best nway of the top_n scored passages")
  if teacher_cfg.pairwise.scale and teacher_cfg.pairwise.scorer != "retriever":
    raise config_lib.ConfigError(f"teacher.pairwise.scale={teacher_cfg.pairwise.scale} scales a retriever's margins; "
                                 f"teacher.pairwise.scorer={teacher_cfg.pairwise.scorer!r} gives probabilities itself")
  for role, scorers in (("pointwise", load.POINTWISE_SCORERS), ("pairwise", load.PAIRWISE_SCORERS)):
    if teacher_cfg[role].scorer not in scorers:
      raise config_lib.ConfigError(f"teacher.{role}.scorer must be one of {scorers}, got {teacher_cfg[role].scorer!r}")
    if teacher_cfg[role].batch_per_device < 1:
      raise config_lib.ConfigError(
          f"teacher.{role}.batch_per_device must be >= 1, got {teacher_cfg[role].batch_per_device}")


def settings(teacher_cfg: ml_collections.ConfigDict, run_path: pathlib.Path, queries: formats.TextSource,
             collection: formats.TextSource, pointwise: Teacher | load.RetrieverTeacher,
             pairwise: Teacher | load.RetrieverTeacher | None, tensor: int) -> dict:
  """What the output depends on; chunks of other settings are never mixed into it."""
  roles = {role: {k: teacher_cfg[role][k] for k in ("scorer", "model", "tokenizer", "max_length", "dtype")}
           for role in ("pointwise", "pairwise")}
  roles["pointwise"].update(resolved=pointwise.name, scale=_scale(teacher_cfg, pointwise))
  if isinstance(pairwise, load.RetrieverTeacher):
    roles["pairwise"].update(resolved=pairwise.name, scale=pairwise.scale)
  # Not batch_per_device (a restart after running out of memory may lower it) nor the data/fsdp axes: rows
  # are scored independently. A tensor axis splits the sums inside each row, so its size is recorded.
  return {"run": str(run_path), "run_sha256": array_cache.file_identity(run_path)["sha256"],
          "queries": str(queries.path), "collection": str(collection.path), "queries_read": queries.settings(),
          "collection_read": collection.settings(), **roles, "mesh_tensor": tensor,
          **{k: teacher_cfg[k] for k in ("top_n", "nway", "topk", "max_distance", "n_pairs", "seed",
                                         "chunk_queries", "bucket_multiple")}}


def _ranked(scored: dict[str, float], top_n: int) -> list[str]:
  return [doc for doc, _ in metrics.ranked(scored)[:top_n]]


def _scale(teacher_cfg: ml_collections.ConfigDict, pointwise: Teacher | load.RetrieverTeacher) -> float:
  if isinstance(pointwise, load.RetrieverTeacher):
    return pointwise.scale
  return load.teacher_scale(teacher_cfg.pointwise)


def _count_and_check(run_path: pathlib.Path, queries, collection, queries_path, collection_path,
                     top_n: int) -> tuple[int, int]:
  """The numbers of queries and of passages to score in the run, after checking that every id has a text
  (before any scoring)."""
  n_queries = n_passages = 0
  for qid, scored in formats.iter_run(run_path):
    if qid not in queries:
      raise ValueError(f"{run_path}: query {qid!r} is not in {queries_path}")
    for pid in scored:
      if pid not in collection:
        raise ValueError(f"{run_path}: passage {pid!r} (query {qid!r}) is not in {collection_path}")
    n_queries += 1
    n_passages += min(len(scored), top_n)
  return n_queries, n_passages


def _chunks(run_path: pathlib.Path, top_n: int, size: int) -> Iterator[list[tuple[str, list[str]]]]:
  """The run streamed as lists of `size` (qid, top_n candidate pids), in file order."""
  chunk = []
  for qid, scored in formats.iter_run(run_path):
    chunk.append((qid, _ranked(scored, top_n)))
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def _chunk_dir(out: pathlib.Path, manifest: dict) -> io.ChunkDir:
  """OUTPUT.chunks: the finished chunks of the output's queries (see the module docstring)."""
  return io.ChunkDir(out.with_name(out.name + CHUNKS_SUFFIX), manifest, chunk_glob="*.jsonl", done_name=CHUNK_NAME,
                     remedy="set --config.teacher.output elsewhere")


class _TeacherScorers:
  """The loaded teachers as scorers, which count their items and seconds: the pointwise one (a model on the
  teacher mesh, or a retriever over its stored collection vectors) with the scale of its scores, and the
  pairwise one (a model, a retriever with its own scale, or None: the pointwise-margin rule)."""

  def __init__(self, teacher_cfg: ml_collections.ConfigDict, pointwise: Teacher | load.RetrieverTeacher,
               pairwise: Teacher | load.RetrieverTeacher | None, mesh: jax.sharding.Mesh, rules: sharding.Rules, *,
               collection, corpus_dirs: dict[str, pathlib.Path]):
    self.scale = _scale(teacher_cfg, pointwise)
    self.pairwise_scale = pairwise.scale if isinstance(pairwise, load.RetrieverTeacher) else 1.0
    self.pairs_scored = 0

    def scorer(teacher, role):
      cfg = teacher_cfg[role]
      if isinstance(teacher, load.RetrieverTeacher):
        return RetrieverScorer(teacher.encoder, collection, reuse_dir=corpus_dirs["mining"],
                               own_dir=corpus_dirs[role], batch_size=cfg.batch_per_device * teacher.encoder.mesh.size)
      return ShardedScorer(teacher, mesh, rules, batch_per_device=cfg.batch_per_device,
                           bucket_multiple=teacher_cfg.bucket_multiple)

    self.pointwise = scorer(pointwise, "pointwise")
    self.pairwise = None if pairwise is None else scorer(pairwise, "pairwise")

  def pointwise_scores(self, chunk: Sequence[tuple[str, list[str]]], queries, collection,
                       on_batch: Callable[[int], object]) -> list[np.ndarray]:
    """Each query's candidate scores as teacher logits (times the pointwise scale)."""
    if isinstance(self.pointwise, RetrieverScorer):
      scores = self.pointwise.score([queries[qid] for qid, _ in chunk], [pids for _, pids in chunk], on_batch)
    else:
      texts = [(queries[qid], collection[pid]) for qid, pids in chunk for pid in pids]
      flat = self.pointwise.score(self.pointwise.teacher.encode(texts), on_batch)
      scores = np.split(flat, np.cumsum([len(pids) for _, pids in chunk])[:-1])
    return [(s * np.float32(self.scale)).astype(np.float32) for s in scores]


def _score_chunk(chunk: Sequence[tuple[str, list[str]]], queries, collection, scorers: _TeacherScorers,
                 teacher_cfg: ml_collections.ConfigDict,
                 on_batch: Callable[[int], object]) -> list[formats.TrainingExample]:
  """Training lines of one chunk of (qid, candidate pids)."""
  lines = []
  for (qid, pids), scores in zip(chunk, scorers.pointwise_scores(chunk, queries, collection, on_batch)):
    order = np.argsort(-scores, kind="stable")[:teacher_cfg.nway]
    selected = pairs.select_pairs(
        qid, len(order), topk=teacher_cfg.topk, max_distance=teacher_cfg.max_distance, n_pairs=teacher_cfg.n_pairs,
        seed=teacher_cfg.seed) if teacher_cfg.pairwise.scorer != "none" else []
    lines.append((qid, [pids[o] for o in order], scores[order], selected))
  logps = _pair_log_probs(lines, queries, collection, scorers)
  examples, offset = [], 0
  for qid, line_pids, line_scores, selected in lines:
    line_logps = logps[offset:offset + len(selected)]
    offset += len(selected)
    examples.append(formats.TrainingExample(
        qid=qid, pids=tuple(line_pids), scores=tuple(float(s) for s in line_scores),
        pairs=tuple((i, j, float(min(lp, 0.0))) for (i, j), lp in zip(selected, line_logps))))
  return examples


def _pair_log_probs(lines, queries, collection, scorers: _TeacherScorers) -> np.ndarray:
  """log P(i beats j) for every selected pair of every line, in order."""
  scorers.pairs_scored += sum(len(selected) for *_, selected in lines)
  if scorers.pairwise is None:  # the pointwise teacher's margins: log σ(t_i − t_j)
    margins = [s[i] - s[j] for _, _, s, selected in lines for i, j in selected]
    return _log_sigmoid(margins)
  if isinstance(scorers.pairwise, RetrieverScorer):  # its own margins: log σ(scale · (s_i − s_j))
    with_pairs = [(qid, p, selected) for qid, p, _, selected in lines if selected]
    if not with_pairs:
      return np.zeros(0, np.float32)
    scores = scorers.pairwise.score([queries[qid] for qid, _, _ in with_pairs], [p for _, p, _ in with_pairs])
    margins = [s[i] - s[j] for (_, _, selected), s in zip(with_pairs, scores) for i, j in selected]
    return _log_sigmoid(np.float32(scorers.pairwise_scale) * np.asarray(margins, np.float32))
  texts = [(queries[qid], collection[p[i]], collection[p[j]]) for qid, p, _, selected in lines for i, j in selected]
  if not texts:
    return np.zeros(0, np.float32)
  return scorers.pairwise.score(scorers.pairwise.teacher.encode(texts))


def _log_sigmoid(margins) -> np.ndarray:
  return -np.logaddexp(np.float32(0), -np.asarray(margins, np.float32))


def score(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *, queries_path: str,
          collection_path: str, student: Callable | None = None,
          devices: Sequence[jax.Device] | None = None) -> Scored:
  """Scores `config.teacher.run` into `config.teacher.output` (see the module docstring).

  The texts come from `queries_path` and `collection_path` (TSV files or BEIR, read with data.split and
  data.title_separator). student(cfg, role) -> Encoder builds a retriever teacher; devices (default: all) carry
  the
  teacher mesh.
  """
  teacher_cfg = config.teacher
  check_teacher_config(teacher_cfg)
  start = time.perf_counter()
  run_path = paths.resolve_path(teacher_cfg.run, workdir)
  out = paths.resolve_path(teacher_cfg.output, workdir)
  if not run_path.exists():
    raise FileNotFoundError(f"teacher.run: {run_path} does not exist; mine it first (--mode=mine)")
  queries_source = config_lib.data_source(config, queries_path, "queries")
  collection_source = config_lib.data_source(config, collection_path, "docs")
  load.check_model_dirs(teacher_cfg)
  mesh = teacher_mesh(teacher_cfg, devices)
  pointwise = load.load(teacher_cfg.pointwise, "pointwise", student)
  pairwise = (None if teacher_cfg.pairwise.scorer in ("none", "pointwise")
              else load.load(teacher_cfg.pairwise, "pairwise", student))
  manifest = settings(teacher_cfg, run_path, queries_source, collection_source, pointwise, pairwise,
                      mesh.shape["tensor"])
  recorded = io.read_json(io.sidecar(out)) or {}
  if distributed.process_0_decides(out.exists() and recorded.get("settings") == manifest):
    _log.info("Scoring: %s is up to date (same run, teachers and settings); skipped", out)
    return Scored(out, -1, -1, 0.0, 0.0, 0.0, skipped=True)
  queries, collection = queries_source.read(), collection_source.read()
  n_queries, n_passages = _count_and_check(run_path, queries, collection, queries_path, collection_path,
                                           teacher_cfg.top_n)
  corpus_dirs = {"mining": mining.corpus_location(config, workdir, run_path),
                 **{role: out.parent / name for role, name in TEACHER_CORPUS_DIRS.items()}}
  scorers = _TeacherScorers(teacher_cfg, pointwise, pairwise, mesh, sharding.rules(config), collection=collection,
                            corpus_dirs=corpus_dirs)

  chunk_dir = _chunk_dir(out, manifest)
  chunk_dir.open()
  n_chunks = -(-n_queries // teacher_cfg.chunk_queries)
  done = chunk_dir.done(n_chunks)
  _log.info("Scoring %d queries of %s with %s and %s on mesh %s: %d chunks, %d already done", n_queries,
            run_path, pointwise.name, pairwise.name if pairwise else f"pairwise={teacher_cfg.pairwise.scorer}",
            dict(mesh.shape), n_chunks, int(done.sum()))
  bar = tqdm.tqdm(total=n_passages, unit="passage", disable=jax.process_index() != 0, desc="score",
                  dynamic_ncols=True)
  for index, chunk in enumerate(_chunks(run_path, teacher_cfg.top_n, teacher_cfg.chunk_queries)):
    if not done[index]:
      examples = _score_chunk(chunk, queries, collection, scorers, teacher_cfg, bar.update)
      if jax.process_index() == 0:
        formats.write_training_lines(chunk_dir.path(CHUNK_NAME, index), examples)
      bar.set_postfix(_rates(scorers), refresh=False)
    else:
      bar.update(sum(len(pids) for _, pids in chunk))
  bar.close()
  num_pairs = _join_chunks(chunk_dir, n_chunks, out, manifest)
  _remove_teacher_corpus(scorers, config)
  seconds = time.perf_counter() - start
  rates = _rates(scorers)
  _log.info("Scored %s: %d queries, %d pairs in %.1f s (%s)", out, n_queries, num_pairs, seconds,
            ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
  return Scored(out, n_queries, num_pairs, seconds, rates["passages/s"], rates.get("pairs/s", 0.0))


def _remove_teacher_corpus(scorers: _TeacherScorers, config: ml_collections.ConfigDict) -> None:
  """A retriever teacher's collection vectors are deleted once the lines are written (also the mining run's,
  which mining kept for this reuse), unless mine.keep_corpus."""
  if not config.mine.keep_corpus and jax.process_index() == 0:
    for scorer in (scorers.pointwise, scorers.pairwise):
      if isinstance(scorer, RetrieverScorer):
        shutil.rmtree(scorer.corpus_dir, ignore_errors=True)
  distributed.barrier("teacher corpus removed")


def _rates(scorers: _TeacherScorers) -> dict[str, float]:
  rates = {"passages/s": scorers.pointwise.items_scored / max(scorers.pointwise.seconds, 1e-9)}
  if scorers.pairwise is not None:
    rates["pairs/s"] = scorers.pairs_scored / max(scorers.pairwise.seconds, 1e-9)
  return rates


def _join_chunks(chunk_dir: io.ChunkDir, n_chunks: int, out: pathlib.Path, manifest: dict) -> int:
  """Concatenates the chunks into `out` (process 0), records the settings, removes the chunks; the pair count."""
  num_pairs = 0
  if jax.process_index() == 0:
    out.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(out) as f:
      for index in range(n_chunks):
        text = chunk_dir.path(CHUNK_NAME, index).read_text(encoding="utf-8")
        num_pairs += sum(len(entry[2]) for line in text.splitlines() for entry in json.loads(line)[1:])
        f.write(text)
    io.write_json(io.sidecar(out), {"settings": manifest, "pairs": num_pairs})
    chunk_dir.remove()
  distributed.barrier("scored lines written")
  return num_pairs
