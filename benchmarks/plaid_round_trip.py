"""PLAID round trip: the demo ColBERT, trained and exported here, retrieved by PyLate's PLAID index.

  PYLATE_PYTHON=.venv-ext/pylate/bin/python .venv/bin/python benchmarks/plaid_round_trip.py --workdir=/tmp/plaid
  make check-colbert-libs     # builds that PyLate environment and runs this after tests/test_export.py

Trains the demo through the CLI (configs/colbert.py:demo), exports it (`--mode=export`) and evaluates it
exactly (`--mode=evaluate`: WORKDIR/eval/metrics.json). Then, in the PyLate environment, it loads
WORKDIR/export/pylate with `pylate.models.ColBERT`, encodes the demo collection and dev queries and retrieves
the top 100 three ways: exact MaxSim over every passage (`pylate.rank.rerank`), a PLAID index
(`pylate.indexes.PLAID`, the fast-plaid backend) and a Voyager HNSW index over the token vectors
(`pylate.indexes.Voyager` + `pylate.retrieve.ColBERT`). Every run is scored here by the project's own metrics
code (ir-measures) on the same judged queries, collection and qrels as the exact evaluation
(`eval_data.load_data` of the demo config). It prints the numbers side by side and fails when

* PyLate's exact nDCG@10 differs from ours by more than --exact_tolerance (1e-4: the export's embeddings
  equal ours to 1e-5, tests/test_export.py, so only a near-tie can reorder a ranking), or
* PLAID's (at --nbits, 8 by default) or Voyager's differs by more than --tolerance (0.03). Both are
  approximate. PLAID scores passages from residuals compressed to nbits per dimension, over the centroids
  probed per query token (--n_ivf_probe), and its k-means differs from run to run even with a fixed seed;
  Voyager's candidates are the HNSW neighbours of each query token, then scored exactly. Measured here over
  nine nbits=8 indexes (seeds 42, 1, 2, 3, repeats), PLAID's nDCG@10 was 0.0007-0.016 below the exact 0.7514
  (a relevant passage moving from rank 1 to 2 costs 0.0037): 0.03 is about twice the worst seen. Encoding
  drift is the first bound's business (queries without their [MASK] expansion cost 0.0036 here); this one
  catches a broken index round trip (mixed-up passage ids: near 0). Voyager matched exactly every time.
  --report_nbits (4,2: 4 is PyLate's default) are printed but not asserted: on this demo's 32-dimensional
  vectors coarser residuals cost much more than on 128-dimensional ColBERTv2 ones (nbits=4: -0.044 to -0.053,
  nbits=2: -0.14 to -0.17, over the same runs).

--reuse skips training, export and evaluation when WORKDIR already holds them.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
K = 100
METRIC = "nDCG@10"


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="workdir/plaid_round_trip")
  parser.add_argument("--pylate_python", default=os.environ.get("PYLATE_PYTHON", ""),
                      help="a python with pylate, fast-plaid and voyager (default: $PYLATE_PYTHON)")
  parser.add_argument("--reuse", action="store_true", help="keep WORKDIR's trained, exported, evaluated demo")
  parser.add_argument("--nbits", type=int, default=8, help="PLAID residual bits per dimension (asserted)")
  parser.add_argument("--report_nbits", default="4,2", help="more PLAID nbits, reported and not asserted")
  parser.add_argument("--kmeans_niters", type=int, default=4)
  parser.add_argument("--n_ivf_probe", type=int, default=8, help="PLAID centroids probed per query token")
  parser.add_argument("--seed", type=int, default=42, help="PLAID k-means seed")
  parser.add_argument("--tolerance", type=float, default=0.03, help="max |approximate - exact| nDCG@10")
  parser.add_argument("--exact_tolerance", type=float, default=1e-4, help="max |PyLate exact - ours| nDCG@10")
  # The child half, run by --pylate_python.
  parser.add_argument("--child", nargs=2, metavar=("INPUT_JSON", "OUTPUT_JSON"), help=argparse.SUPPRESS)
  return parser.parse_args()


# ---- the PyLate half (imports only pylate and what it brings) ----

def _pylate_child(args: argparse.Namespace) -> None:
  """Encodes with the exported model, retrieves exactly, with PLAID and with Voyager; writes the runs."""
  import numpy as np
  from pylate import indexes, models, rank, retrieve

  spec = json.loads(pathlib.Path(args.child[0]).read_text())
  doc_ids, doc_texts = spec["doc_ids"], spec["docs"]
  query_ids, query_texts = spec["query_ids"], spec["queries"]
  index_dir = pathlib.Path(args.child[1]).parent / "indexes"
  seconds = {}

  start = time.perf_counter()
  model = models.ColBERT(model_name_or_path=spec["model_dir"], device="cpu")
  docs_D = model.encode(doc_texts, is_query=False, batch_size=64, show_progress_bar=False)
  queries_Q = model.encode(query_texts, is_query=True, batch_size=64, show_progress_bar=False)
  seconds["encode"] = time.perf_counter() - start
  tokens = sum(len(d) for d in docs_D)

  def as_run(results) -> dict[str, dict[str, float]]:
    return {qid: {r["id"]: float(r["score"]) for r in ranked[:K]} for qid, ranked in zip(query_ids, results)}

  runs = {}
  start = time.perf_counter()
  reranked = rank.rerank(documents_ids=[doc_ids] * len(query_ids), queries_embeddings=queries_Q,
                         documents_embeddings=[docs_D] * len(query_ids), device="cpu")
  runs["pylate_exact"] = as_run(reranked)
  seconds["exact"] = time.perf_counter() - start

  for nbits in spec["nbits"]:
    start = time.perf_counter()
    plaid = indexes.PLAID(index_folder=str(index_dir), index_name=f"plaid_nbits{nbits}", override=True, nbits=nbits,
                          kmeans_niters=spec["kmeans_niters"], n_ivf_probe=spec["n_ivf_probe"], seed=spec["seed"],
                          use_triton=False, device="cpu", show_progress=False)
    plaid.add_documents(documents_ids=doc_ids, documents_embeddings=docs_D)
    seconds[f"plaid_nbits{nbits}_index"] = time.perf_counter() - start
    start = time.perf_counter()
    runs[f"plaid_nbits{nbits}"] = as_run(retrieve.ColBERT(index=plaid).retrieve(queries_embeddings=queries_Q, k=K))
    seconds[f"plaid_nbits{nbits}_search"] = time.perf_counter() - start

  start = time.perf_counter()
  voyager = indexes.Voyager(index_folder=str(index_dir), index_name="voyager", override=True,
                            embedding_size=int(np.asarray(docs_D[0]).shape[1]))
  voyager.add_documents(documents_ids=doc_ids, documents_embeddings=docs_D)
  seconds["voyager_index"] = time.perf_counter() - start
  start = time.perf_counter()
  runs["voyager"] = as_run(retrieve.ColBERT(index=voyager).retrieve(queries_embeddings=queries_Q, k=K))
  seconds["voyager_search"] = time.perf_counter() - start

  import importlib.metadata as md
  versions = {name: md.version(name) for name in ("pylate", "fast-plaid", "voyager", "torch")}
  pathlib.Path(args.child[1]).write_text(json.dumps(
      {"runs": runs, "seconds": seconds, "versions": versions, "doc_tokens": tokens}))


# ---- the project half (.venv) ----

def _cli(workdir: pathlib.Path, mode: str | None) -> None:
  command = [sys.executable, "-m", "pairdistill_jax.main", "--config=configs/colbert.py:demo",
             f"--workdir={workdir}"] + ([f"--mode={mode}"] if mode else [])
  print("+", " ".join(command[1:]), flush=True)
  run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
  if run.returncode != 0:
    raise SystemExit(f"{' '.join(command)} failed ({run.returncode}):\n{run.stderr[-4000:]}")


def _demo_config():
  from pairdistill_jax import config_lib  # noqa: PLC0415 (imported once sys.path holds the checkout)

  return config_lib.load_config(f"{ROOT / 'configs' / 'colbert.py'}:demo")


def main() -> None:
  args = _parse_args()
  if args.child:
    _pylate_child(args)
    return
  if not args.pylate_python:
    raise SystemExit("set PYLATE_PYTHON (or --pylate_python) to a python with pylate, fast-plaid and voyager "
                     "(make check-colbert-libs builds one)")
  sys.path.insert(0, str(ROOT))
  from pairdistill_jax import students
  from pairdistill_jax.retrieval import eval_data, metrics

  start = time.perf_counter()
  workdir = pathlib.Path(args.workdir).resolve()
  metrics_file = workdir / "eval" / "metrics.json"
  model_dir = workdir / "export" / "pylate"
  if not (args.reuse and metrics_file.exists() and model_dir.exists()):
    for mode in (None, "export", "evaluate"):
      _cli(workdir, mode)
  ours = json.loads(metrics_file.read_text())
  if ours["index"] != "exact":
    raise SystemExit(f"{metrics_file}: index {ours['index']!r}, expected an exact evaluation")

  config = _demo_config()
  separator = students.title_separator(config.data.title_separator, config.model.kind)
  data = eval_data.load_data(config.eval, workdir, title_separator=separator)
  plaid_dir = workdir / "plaid_round_trip"
  plaid_dir.mkdir(parents=True, exist_ok=True)
  spec = {"model_dir": str(model_dir), "doc_ids": list(data.collection), "docs": list(data.collection.values()),
          "query_ids": list(data.queries), "queries": list(data.queries.values()),
          "nbits": [args.nbits] + [int(n) for n in args.report_nbits.split(",") if n],
          **{key: getattr(args, key) for key in ("kmeans_niters", "n_ivf_probe", "seed")}}
  (plaid_dir / "input.json").write_text(json.dumps(spec))
  child = subprocess.run([os.path.abspath(args.pylate_python), str(pathlib.Path(__file__).resolve()), "--child",
                          str(plaid_dir / "input.json"), str(plaid_dir / "runs.json")],
                         cwd=plaid_dir, capture_output=True, text=True)
  if child.returncode != 0:
    raise SystemExit(f"the PyLate half failed ({child.returncode}):\n{child.stderr[-4000:]}")
  result = json.loads((plaid_dir / "runs.json").read_text())

  exact = ours["metrics"][METRIC]
  scored = {name: metrics.compute_metrics(run, data.qrels, [METRIC])[METRIC] for name, run in result["runs"].items()}
  print(f"PLAID round trip: {ours['model']}, {len(data.queries)} dev queries, {len(data.collection)} passages "
        f"({result['doc_tokens']} token vectors), top {K}; "
        + ", ".join(f"{name} {version}" for name, version in result["versions"].items()))
  print(f"  PLAID settings: kmeans_niters={args.kmeans_niters} n_ivf_probe={args.n_ivf_probe} seed={args.seed}")
  print(f"  {METRIC}  {'exact (pairdistill_jax --mode=evaluate)':<40}  {exact:.4f}")
  rows = [("pylate_exact", "PyLate exact MaxSim (rank.rerank)", args.exact_tolerance),
          (f"plaid_nbits{args.nbits}", f"PyLate PLAID nbits={args.nbits} (fast-plaid)", args.tolerance)]
  rows += [(name, f"PyLate PLAID nbits={name[len('plaid_nbits'):]} (fast-plaid)", None)
           for name in result["runs"] if name.startswith("plaid_nbits") and name != rows[1][0]]
  rows.append(("voyager", "PyLate Voyager (HNSW + MaxSim)", args.tolerance))
  failures = []
  for name, label, tolerance in rows:
    difference = scored[name] - exact
    ok = tolerance is None or abs(difference) <= tolerance
    bound = "not asserted" if tolerance is None else f"tolerance {tolerance:g}"
    print(f"  {METRIC}  {label:<40}  {scored[name]:.4f}  (difference {difference:+.4f}, {bound})"
          f"{'' if ok else '  FAIL'}")
    if not ok:
      failures.append(f"{label}: {scored[name]:.4f} vs exact {exact:.4f}")
  print("  seconds: " + ", ".join(f"{key} {value:.1f}" for key, value in result["seconds"].items())
        + f"; total with training {time.perf_counter() - start:.0f}")
  if failures:
    raise SystemExit("nDCG@10 outside tolerance: " + "; ".join(failures))


if __name__ == "__main__":
  main()
