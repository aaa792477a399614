"""Test helpers: batches tokenised on the fly, BEIR writers and in-memory stores (what the package reads from
files and stores, built directly)."""

import json
import pathlib
import types
from collections.abc import Mapping, Sequence

import numpy as np

from pairdistill_jax.data import batching, demo, formats
from pairdistill_jax.data.formats import PathLike, TrainingExample
from pairdistill_jax.data.tokenization import ColBERTTokenizer, load_tokenizer
from pairdistill_jax.io import atomic_write
from pairdistill_jax.retrieval import corpus


def make_batch(examples: Sequence[TrainingExample], collection: Mapping[str, str],
               queries: Mapping[str, str], tokenizer, *, nway: int, max_pairs: int) -> dict[str, np.ndarray]:
  """Tokenises `examples` (B = len(examples)) into the layout of data.batching, as the pipeline's stores do."""
  targets = batching.pack_targets(examples, nway=nway, max_pairs=max_pairs)
  texts = []
  for ex in examples:
    kept = [collection[pid] for pid in ex.pids[:nway]]
    texts.extend(kept + [""] * (nway - len(kept)))
  return batching.assemble_batch(tokenizer.encode_queries([queries[ex.qid] for ex in examples]),
                                 tokenizer.encode_docs(texts), targets)


def write_beir_corpus(path: PathLike, docs: Mapping[str, Mapping[str, str]]) -> None:
  """Writes BEIR corpus.jsonl lines `{"_id", "title", "text"}` from {id: {"title": ..., "text": ...}}."""
  with atomic_write(path) as f:
    for doc_id, doc in docs.items():
      if "text" not in doc:
        raise ValueError(f"document {doc_id!r} has no 'text'")
      f.write(json.dumps({"_id": doc_id, "title": doc.get("title", ""), "text": doc["text"]}) + "\n")


def write_beir_queries(path: PathLike, queries: Mapping[str, str]) -> None:
  """Writes BEIR queries.jsonl lines `{"_id", "text"}`."""
  with atomic_write(path) as f:
    for qid, text in queries.items():
      f.write(json.dumps({"_id": qid, "text": text}) + "\n")


def token_store(vectors_TxD: np.ndarray, lengths_N: np.ndarray) -> corpus.EmbeddingStore:
  """A multi-vector store of one chunk holding every document."""
  return corpus.EmbeddingStore([vectors_TxD], lengths_N, chunk_size=max(len(lengths_N), 1))


def write_training_data(root: pathlib.Path, collection: Mapping[str, str], queries: Mapping[str, str],
                        examples: Sequence[TrainingExample], tokenizer_dir: PathLike) -> types.SimpleNamespace:
  """collection.tsv, queries.tsv and train.jsonl in `root`, with a small ColBERT tokenizer: what
  pipeline.train_iterator reads (`paths`) and the inputs themselves."""
  formats.write_collection(root / "collection.tsv", collection)
  formats.write_queries(root / "queries.tsv", queries)
  formats.write_training_lines(root / "train.jsonl", examples)
  tokenizer = ColBERTTokenizer(load_tokenizer(tokenizer_dir), query_maxlen=8, doc_maxlen=16)
  paths = types.SimpleNamespace(train=str(root / "train.jsonl"), collection=str(root / "collection.tsv"),
                                queries=str(root / "queries.tsv"))
  return types.SimpleNamespace(root=root, collection=collection, queries=queries, examples=examples,
                               tokenizer=tokenizer, paths=paths)


def beir_from_demo(root: pathlib.Path, num_docs: int, num_train: int, num_test: int) -> pathlib.Path:
  """A BEIR folder at `root` made from the demo's data (the project's own; SciFact stays outside): its first
  `num_docs` passages (every fifth with a title) plus those judged for its first `num_train` train queries (the
  best teacher-scored passage) and `num_test` dev queries (as the test split)."""
  demo_dir = root.parent / (root.name + "_source")
  demo.generate(demo_dir)
  (root / "qrels").mkdir(parents=True)
  lines = list(formats.read_training_lines(demo_dir / "train.jsonl"))[:num_train]
  judged = {"train": {ex.qid: {ex.pids[max(range(len(ex.pids)), key=ex.scores.__getitem__)]: 1} for ex in lines},
            "test": dict(list(formats.read_qrels(demo_dir / "qrels.dev.tsv").items())[:num_test])}
  for split, qrels in judged.items():
    formats.write_qrels(root / "qrels" / f"{split}.tsv", qrels, beir=True)
  collection = formats.read_collection(demo_dir / "collection.tsv")
  docs = list(collection)[:num_docs] + [d for qrels in judged.values() for q in qrels.values() for d in q]
  (root / "corpus.jsonl").write_text("".join(
      json.dumps({"_id": d, "title": collection[d].split()[0] if i % 5 == 0 else "", "text": collection[d]}) + "\n"
      for i, d in enumerate(dict.fromkeys(docs))))
  queries = formats.read_queries(demo_dir / "queries.train.tsv") | formats.read_queries(demo_dir / "queries.dev.tsv")
  (root / "queries.jsonl").write_text("".join(json.dumps({"_id": q, "text": queries[q]}) + "\n"
                                              for qrels in judged.values() for q in qrels))
  return root
