"""Relevance judgments: TREC qrels (`qid 0 docid rel`) and BEIR's (`qrels/<split>.tsv`, with a header row)."""

from __future__ import annotations

from collections.abc import Mapping

from pairdistill_jax import io
from pairdistill_jax.data.formats.common import (FormatError, PathLike, bounded_id, iter_lines, parse_int,
                                                 trec_field)

_BEIR_QRELS_HEADER = ["query-id", "corpus-id", "score"]


def _parse_qrel(line: str, beir: bool) -> tuple[str, str, int]:
  if beir:
    columns = line.split("\t")
    if len(columns) != 3:
      raise ValueError(f"expected 3 tab-separated columns (query-id, corpus-id, score), found {len(columns)}")
    qid, docid, rel = columns
  else:
    columns = line.split()
    if len(columns) != 4:
      raise ValueError(f"expected 4 columns (TREC qrels: qid 0 docid rel), found {len(columns)}")
    qid, _, docid, rel = columns
  return bounded_id(qid, "query id"), bounded_id(docid, "document id"), parse_int(rel, "relevance")


def read_qrels(path: PathLike) -> dict[str, dict[str, int]]:
  """Qrels -> {qid: {docid: relevance}}.

  BEIR (a header row `query-id corpus-id score`, then tab-separated rows) or TREC (`qid 0 docid rel`),
  detected per file from its first line.
  """
  qrels: dict[str, dict[str, int]] = {}
  beir = None
  for number, line in iter_lines(path, io.BadLines(path, False, None)):
    if beir is None:
      beir = line.split() == _BEIR_QRELS_HEADER
      if beir:
        continue
    try:
      qid, docid, rel = _parse_qrel(line, beir)
    except ValueError as e:
      raise FormatError(path, number, str(e)) from None
    judged = qrels.setdefault(qid, {})
    if docid in judged:
      raise FormatError(path, number, f"duplicate judgment for query {qid!r}, document {docid!r}")
    judged[docid] = rel
  if not qrels:
    raise FormatError(path, number, "no judgments (only a header)")
  return qrels


def write_qrels(path: PathLike, qrels: Mapping[str, Mapping[str, int]], *, beir: bool = False) -> None:
  """Writes TREC qrels lines `qid 0 docid rel`, or (beir) the BEIR header and `qid \\t docid \\t rel` rows."""
  with io.atomic_write(path) as f:
    if beir:
      f.write("\t".join(_BEIR_QRELS_HEADER) + "\n")
    for qid, judged in qrels.items():
      trec_field(qid, "query id")
      for docid, rel in judged.items():
        trec_field(docid, "document id")
        f.write(f"{qid}\t{docid}\t{int(rel)}\n" if beir else f"{qid} 0 {docid} {int(rel)}\n")
