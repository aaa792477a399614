"""Retrieval metrics from ir-measures, with the conventions of docs/design.md §2.7.

* Every judged query (every query id in the qrels) counts in the mean, retrieved for or not: MS MARCO's
  MRR@10 divides by all judged queries, LoTTE's Success@5 by all questions.
* A run is evaluated in the order it is written to the TREC file (score descending, ties by document id
  ascending): ir-measures receives strictly decreasing scores derived from that order, so the metrics and
  the run file agree on ties (trec_eval would otherwise break them by document id descending).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import ir_measures

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@50", "R@100", "R@200", "R@1000", "Success@5")

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def parse_metrics(names: str | Iterable[str]) -> list[ir_measures.Measure]:
  """ir-measures measures from names ('nDCG@10', ...) or one comma-separated string of them."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  measures = []
  for name in names:
    try:
      measures.append(ir_measures.parse_measure(name))
    except (NameError, ValueError, TypeError) as e:
      raise ValueError(f"unknown metric {name!r} ({e}); use ir-measures names such as "
                       f"{', '.join(DEFAULT_METRICS)}") from None
  if not measures:
    raise ValueError("no metrics given")
  return measures


def ranked(scored: Mapping[str, float]) -> list[tuple[str, float]]:
  """(docid, score) best first: score descending, ties by document id ascending (as `write_run` ranks)."""
  return sorted(scored.items(), key=lambda item: (-item[1], item[0]))


def _rank_scored_docs(run: Run) -> list[ir_measures.ScoredDoc]:
  return [ir_measures.ScoredDoc(qid, docid, float(-rank))
          for qid, scored in run.items() for rank, (docid, _) in enumerate(ranked(scored), 1)]


def per_query(run: Run, qrels: Qrels, metrics: str | Sequence[str] = DEFAULT_METRICS) -> dict[str, dict[str, float]]:
  """{metric name: {query id: value}} for every judged query (0 where the run has nothing for it)."""
  measures = parse_metrics(metrics)
  judged = [ir_measures.Qrel(qid, docid, int(rel)) for qid, docs in qrels.items() for docid, rel in docs.items()]
  if not judged:
    raise ValueError("the qrels hold no judgments")
  values = {str(m): dict.fromkeys(qrels, 0.0) for m in measures}
  for value in ir_measures.iter_calc(measures, judged, _rank_scored_docs(run)):
    if value.query_id in qrels:
      values[str(value.measure)][value.query_id] = value.value
  return values


def compute_metrics(run: Run, qrels: Qrels, metrics: str | Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
  """{metric name: mean over all judged queries}; a judged query absent from the run scores 0."""
  return {name: sum(by_query.values()) / len(qrels) for name, by_query in per_query(run, qrels, metrics).items()}


def format_table(metrics: Mapping[str, float], title: str = "") -> str:
  """A two-column text table of the metrics, under an optional title line."""
  width = max(map(len, metrics), default=6)
  lines = [title] if title else []
  lines += [f"  {name:<{width}}  {value:.4f}" for name, value in metrics.items()]
  return "\n".join(lines)
