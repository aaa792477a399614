"""PairDistill training lines: `[qid, [pid, score, [[j, logp], ...]], ...]`, ColBERTv2's `[qid, [pid, score],
...]` and `[qid, pid, ...]` (docs/design.md §2.3)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

from pairdistill_jax import io
from pairdistill_jax.data.formats.common import PathLike, SkipCallback, json_id, json_number, read_records

_CANONICAL_INT = re.compile(r"0|[1-9][0-9]*")


@dataclasses.dataclass(frozen=True)
class TrainingExample:
  """One training line: a query, its passages (teacher-sorted) and the teacher's pairwise preferences.

  Ids are strings. `scores` are the pointwise teacher's raw logits (None for the `[qid, pid, …]`
  format); `pairs` are (i, j, logp_ij) with i, j indices into `pids` and logp_ij = log P(i beats j).
  Construction validates everything that does not need the collection.
  """

  qid: str
  pids: tuple[str, ...]
  scores: tuple[float, ...] | None
  pairs: tuple[tuple[int, int, float], ...] = ()

  def __post_init__(self) -> None:
    if not self.pids:
      raise ValueError("no passages")
    seen: set[str] = set()
    for pid in self.pids:
      if pid in seen:
        raise ValueError(f"duplicate pid {pid!r}")
      seen.add(pid)
    if self.scores is not None:
      if len(self.scores) != len(self.pids):
        raise ValueError(f"{len(self.scores)} scores for {len(self.pids)} passages")
      for i, score in enumerate(self.scores):
        if not math.isfinite(score):
          raise ValueError(f"non-finite score {score} (passage {i})")
    elif self.pairs:
      raise ValueError("pairs given without pointwise scores")
    for i, j, logp in self.pairs:
      self._check_pair(i, j, logp)

  def _check_pair(self, i: int, j: int, logp: float) -> None:
    n = len(self.pids)
    for index in (i, j):
      if not 0 <= index < n:
        raise ValueError(f"pair index {index} out of range (line has {n} passages)")
    if i == j:
      raise ValueError(f"pair ({i}, {j}) compares a passage with itself")
    if not math.isfinite(logp):
      raise ValueError(f"non-finite logp {logp} (pair {i}, {j})")
    if logp > 0:
      raise ValueError(f"logp {logp} > 0 (a probability above 1) (pair {i}, {j})")


def _parse_entry(i: int, entry: Any) -> tuple[str, float, list[tuple[int, int, float]]]:
  """[pid, score] or [pid, score, [[j, logp], ...]] -> (pid, score, pairs)."""
  if not isinstance(entry, list) or len(entry) not in (2, 3):
    raise ValueError(f"passage entry {i} must be [pid, score] or [pid, score, [[j, logp], ...]]")
  pid = json_id(entry[0], f"pid of entry {i}")
  score = json_number(entry[1], f"score of entry {i}")
  raw_pairs = entry[2] if len(entry) == 3 else []
  if not isinstance(raw_pairs, list):
    raise ValueError(f"pairs of entry {i} must be a list of [j, logp]")
  pairs = []
  for pair in raw_pairs:
    if not (isinstance(pair, list) and len(pair) == 2 and type(pair[0]) is int):
      raise ValueError(f"pair {json.dumps(pair)} of entry {i} must be [j, logp] with an integer j")
    pairs.append((i, pair[0], json_number(pair[1], f"logp of pair {pair[0]} of entry {i}")))
  return pid, score, pairs


def _parse_training_line(line: str) -> TrainingExample:
  try:
    row = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"malformed JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(row, list) or len(row) < 2:
    raise ValueError("expected a JSON list [qid, passage, ...] with at least one passage")
  qid = json_id(row[0], "qid")
  entries = row[1:]
  if all(not isinstance(e, list) for e in entries):
    pids = tuple(json_id(e, f"pid {i}") for i, e in enumerate(entries))
    return TrainingExample(qid, pids, None)
  parsed = [_parse_entry(i, e) for i, e in enumerate(entries)]
  return TrainingExample(
      qid=qid,
      pids=tuple(p[0] for p in parsed),
      scores=tuple(p[1] for p in parsed),
      pairs=tuple(pair for p in parsed for pair in p[2]),
  )


def _training_line_parser(
    collection_ids: Container[str] | None, query_ids: Container[str] | None, require_scores: bool
) -> Callable[[str], TrainingExample]:
  def parse(line: str) -> TrainingExample:
    example = _parse_training_line(line)
    if require_scores and example.scores is None:
      raise ValueError("no teacher scores: distillation needs [qid, [pid, score, ...], ...] lines, not "
                       "[qid, pid, ...]")
    if query_ids is not None and example.qid not in query_ids:
      raise ValueError(f"qid {example.qid!r} is not in the queries")
    if collection_ids is not None:
      for pid in example.pids:
        if pid not in collection_ids:
          raise ValueError(f"pid {pid!r} is not in the collection")
    return example

  return parse


def iter_training_lines(
    path: PathLike,
    *,
    skip_bad_lines: bool = False,
    collection_ids: Container[str] | None = None,
    query_ids: Container[str] | None = None,
    on_skip: SkipCallback | None = None,
    require_scores: bool = False,
) -> Iterator[tuple[int, TrainingExample]]:
  """Streams (line number, example) of training lines; see `read_training_lines`. With `require_scores`,
  a line without teacher scores (`[qid, pid, …]`) is a bad line."""
  bad = io.BadLines(path, skip_bad_lines, on_skip)
  n_good = 0
  parse = _training_line_parser(collection_ids, query_ids, require_scores)
  for number, example in read_records(path, parse, bad):
    n_good += 1
    yield number, example
  bad.finish(n_good)


def read_training_lines(
    path: PathLike,
    *,
    skip_bad_lines: bool = False,
    collection_ids: Container[str] | None = None,
    query_ids: Container[str] | None = None,
    on_skip: SkipCallback | None = None,
) -> Iterator[TrainingExample]:
  """Streams training lines: PairDistill, ColBERTv2 `[qid, [pid, score], …]` or `[qid, pid, …]`.

  With `collection_ids`, every pid must be in it; with `query_ids`, every qid. With `skip_bad_lines`, bad
  lines are skipped and reported to `on_skip` (e.g. `errors.append`); the count is logged when the file
  ends.
  """
  lines = iter_training_lines(path, skip_bad_lines=skip_bad_lines, collection_ids=collection_ids,
                              query_ids=query_ids, on_skip=on_skip)
  return (example for _, example in lines)


def _id_to_json(value: str) -> str | int:
  """Ids that look like canonical integers go back to JSON as integers (as MS MARCO's files have them)."""
  return int(value) if _CANONICAL_INT.fullmatch(value) else value


def _number_to_json(value: float) -> int | float:
  return value if type(value) is int else float(value)


def _training_line(example: TrainingExample) -> str:
  """The PairDistill JSON line (json.dumps with its default separators)."""
  qid = _id_to_json(example.qid)
  if example.scores is None:
    return json.dumps([qid, *(_id_to_json(pid) for pid in example.pids)])
  pairs_by_entry: list[list[list[int | float]]] = [[] for _ in example.pids]
  for i, j, logp in example.pairs:
    pairs_by_entry[i].append([int(j), _number_to_json(logp)])
  entries = [
      [_id_to_json(pid), _number_to_json(score), pairs]
      for pid, score, pairs in zip(example.pids, example.scores, pairs_by_entry)
  ]
  return json.dumps([qid, *entries])


def write_training_lines(path: PathLike, examples: Iterable[TrainingExample]) -> int:
  """Writes PairDistill lines (`[qid, pid, …]` for examples without scores); returns the line count.

  Pairs are written under their entry i in the order given, so an example read from a file is written
  back byte for byte.
  """
  count = 0
  with io.atomic_write(path) as f:
    for example in examples:
      f.write(_training_line(example))
      f.write("\n")
      count += 1
  return count
