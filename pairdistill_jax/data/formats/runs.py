"""TREC runs: `qid Q0 docid rank score tag` lines."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

from pairdistill_jax import io
from pairdistill_jax.data.formats.common import (FormatError, PathLike, bounded_id, parse_int, read_records,
                                                 trec_field)


def _parse_run_line(line: str) -> tuple[str, str, float]:
  columns = line.split()
  if len(columns) != 6:
    raise ValueError(f"expected 6 columns (TREC run: qid Q0 docid rank score tag), found {len(columns)}")
  qid, _, docid, rank, score, _ = columns
  parse_int(rank, "rank")
  try:
    value = float(score)
  except ValueError:
    raise ValueError(f"score {score!r} is not a number") from None
  if not math.isfinite(value):
    raise ValueError(f"non-finite score {score}")
  return bounded_id(qid, "query id"), bounded_id(docid, "document id"), value


def read_run(path: PathLike) -> dict[str, dict[str, float]]:
  """TREC run (`qid Q0 docid rank score tag`) -> {qid: {docid: score}}."""
  run: dict[str, dict[str, float]] = {}
  for number, (qid, docid, score) in read_records(path, _parse_run_line, io.BadLines(path, False, None)):
    scored = run.setdefault(qid, {})
    if docid in scored:
      raise FormatError(path, number, f"duplicate document {docid!r} for query {qid!r}")
    scored[docid] = score
  return run


def iter_run(path: PathLike) -> Iterator[tuple[str, dict[str, float]]]:
  """Streams a TREC run query by query: (qid, {docid: score}) per block of consecutive lines.

  For runs too large to hold at once (800k queries x 100). A query whose lines are not consecutive is an
  error (sort the run by query); `read_run` accepts any order.
  """
  qid, scored, seen, number = None, {}, set(), 0
  for number, (line_qid, docid, score) in read_records(path, _parse_run_line, io.BadLines(path, False, None)):
    if line_qid != qid:
      if qid is not None:
        yield qid, scored
      if line_qid in seen:
        raise FormatError(path, number, f"query {line_qid!r} appears again after other queries; sort the run "
                                        f"by query (e.g. `sort -s -k1,1`)")
      qid, scored = line_qid, {}
      seen.add(qid)
    if docid in scored:
      raise FormatError(path, number, f"duplicate document {docid!r} for query {qid!r}")
    scored[docid] = score
  if qid is None:
    raise FormatError(path, number, "no run lines")
  yield qid, scored


def write_run(path: PathLike, run: Mapping[str, Mapping[str, float]] | Iterable[tuple[str, Mapping[str, float]]],
              tag: str = "pairdistill") -> None:
  """Writes a TREC run; each query's documents ranked by score descending, ties by docid ascending.

  `run` may be a stream of (qid, {docid: score}) pairs (written as they come; the file appears only whole).
  """
  trec_field(tag, "run tag")
  with io.atomic_write(path) as f:
    for qid, scored in run.items() if isinstance(run, Mapping) else run:
      trec_field(qid, "query id")
      ranked = sorted(scored.items(), key=lambda item: (-item[1], item[0]))
      for rank, (docid, score) in enumerate(ranked, 1):
        if not math.isfinite(score):
          raise ValueError(f"non-finite score {score} for query {qid!r}, document {docid!r}")
        f.write(f"{qid} Q0 {trec_field(docid, 'document id')} {rank} {float(score)!r} {tag}\n")
