"""The built-in demo: a small synthetic retrieval task in the real file formats, and its vocabulary.

Passages belong to topics and carry a few rare "signature" words; a query names its target passage's topic
and some of its signature words. A noisy teacher scores candidates by word overlap (pointwise logits) and
compares neighbours pairwise (log-probabilities), so training lines look like PairDistill's. Everything is
deterministic in the seed, and the whole task is written in about a second.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import string

import jax
import ml_collections
import numpy as np

from pairdistill_jax import distributed, io, paths, remote
from pairdistill_jax.data import formats

SPECIAL_TOKENS = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILES = ("collection.tsv", "queries.train.tsv", "queries.dev.tsv", "train.jsonl", "qrels.dev.tsv",
         "tokenizer/vocab.txt")
MARKER = "demo.json"  # written last: the settings the task was generated with


def _words(count: int) -> list[str]:
  """Distinct pronounceable lower-case words (whole tokens of the demo vocabulary)."""
  syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
  words = ("".join(p) for n in (2, 3) for p in itertools.product(syllables, repeat=n))
  return list(itertools.islice(words, count))


def write_tokenizer(directory: str | os.PathLike, words: list[str]) -> None:
  """A BERT WordPiece tokenizer directory (vocab.txt + configs) whose words are whole tokens."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  vocab = SPECIAL_TOKENS + list(string.punctuation) + words
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
  (directory / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
       "unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
       "mask_token": "[MASK]"}, indent=2))
  (directory / "special_tokens_map.json").write_text(json.dumps(
      {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
       "mask_token": "[MASK]"}, indent=2))


def _pair_list(scores: np.ndarray, rng: np.random.Generator, n_pairs: int, topk: int = 20,
               max_distance: int = 5, noise: float = 0.5) -> list[tuple[int, int, float]]:
  """Neighbouring pairs (i < j <= i + max_distance in the top-k) with a noisy pairwise teacher."""
  top = min(topk, len(scores))
  candidates = [(i, j) for i in range(top) for j in range(i + 1, min(i + max_distance, top - 1) + 1)]
  chosen = rng.choice(len(candidates), size=min(n_pairs, len(candidates)), replace=False)
  pairs = []
  for c in sorted(chosen):
    i, j = candidates[c]
    margin = scores[i] - scores[j] + rng.normal(0.0, noise)
    pairs.append((i, j, round(-math.log1p(math.exp(-margin)), 6)))  # log σ(margin)
  return pairs


def generate(directory: str | os.PathLike, *, seed: int = 0, topics: int = 40, passages_per_topic: int = 25,
             train_queries: int = 600, dev_queries: int = 100, nway: int = 8, n_pairs: int = 4) -> None:
  """Writes the demo task into `directory` (see FILES and the `tokenizer/` subdirectory)."""
  directory = pathlib.Path(directory)
  rng = np.random.default_rng(seed)
  n_passages = topics * passages_per_topic
  words = _words(8 * topics + 200 + 3 * n_passages)
  topic_words = np.array(words[:8 * topics]).reshape(topics, 8)
  background = words[8 * topics:8 * topics + 200]
  signatures = np.array(words[8 * topics + 200:]).reshape(n_passages, 3)

  passages, passage_topic = {}, []
  for p in range(n_passages):
    topic = p // passages_per_topic
    body = list(rng.choice(topic_words[topic], size=6)) + list(signatures[p])
    body += list(rng.choice(background, size=int(rng.integers(10, 24))))
    rng.shuffle(body)
    cut = int(rng.integers(4, len(body) - 2))
    passages[f"p{p}"] = " ".join(body[:cut]) + ", " + " ".join(body[cut:]) + "."
    passage_topic.append(topic)
  passage_topic = np.array(passage_topic)

  def query_for(target: int) -> str:
    terms = list(rng.choice(topic_words[passage_topic[target]], size=2, replace=False))
    terms += list(rng.choice(signatures[target], size=int(rng.integers(1, 3)), replace=False))
    rng.shuffle(terms)
    return " ".join(terms) + "?"

  def teacher(query: str, candidate: int) -> float:
    terms = set(query.rstrip("?").split())
    own = set(signatures[candidate]) & terms
    topical = set(topic_words[passage_topic[candidate]]) & terms
    return 3.0 * len(own) + 1.0 * len(topical) + rng.normal(0.0, 0.5)

  targets = rng.permutation(n_passages)[:train_queries + dev_queries]
  queries = {f"q{i}": query_for(int(t)) for i, t in enumerate(targets)}
  train_ids, dev_ids = list(queries)[:train_queries], list(queries)[train_queries:]

  examples = []
  for qid, target in zip(train_ids, targets[:train_queries]):
    same_topic = np.flatnonzero(passage_topic == passage_topic[target])
    others = rng.choice(same_topic[same_topic != target], size=nway // 2 - 1, replace=False)
    randoms = rng.choice(np.flatnonzero(passage_topic != passage_topic[target]), size=nway - nway // 2,
                         replace=False)
    candidates = [int(target), *map(int, others), *map(int, randoms)]
    scores = np.array([teacher(queries[qid], c) for c in candidates])
    order = np.argsort(-scores, kind="stable")
    examples.append(formats.TrainingExample(
        qid=qid, pids=tuple(f"p{candidates[o]}" for o in order),
        scores=tuple(round(float(scores[o]), 4) for o in order),
        pairs=tuple(_pair_list(scores[order], rng, n_pairs))))

  directory.mkdir(parents=True, exist_ok=True)
  write_tokenizer(directory / "tokenizer", words)
  formats.write_collection(directory / "collection.tsv", passages)
  formats.write_queries(directory / "queries.train.tsv", {q: queries[q] for q in train_ids})
  formats.write_queries(directory / "queries.dev.tsv", {q: queries[q] for q in dev_ids})
  formats.write_training_lines(directory / "train.jsonl", examples)
  formats.write_qrels(directory / "qrels.dev.tsv",
                      {q: {f"p{int(t)}": 1} for q, t in zip(dev_ids, targets[train_queries:])})
  io.write_json(directory / MARKER, _settings(seed, nway, n_pairs), indent=None)  # last: the data is complete


def _settings(seed: int, nway: int, n_pairs: int) -> dict:
  return {"seed": seed, "nway": nway, "n_pairs": n_pairs}


def ensure(directory: str | os.PathLike, *, nway: int, n_pairs: int, seed: int = 0) -> pathlib.Path:
  """Generates the demo task into `directory` unless a complete one is already there."""
  directory = pathlib.Path(directory)
  marker = directory / MARKER
  complete = marker.exists() and all((directory / name).exists() for name in FILES)
  if not complete or json.loads(marker.read_text()) != _settings(seed, nway, n_pairs):
    generate(directory, seed=seed, nway=nway, n_pairs=n_pairs)
  return directory


def ensure_demo_data(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> None:
  """Writes a :demo config's task into WORKDIR/demo_data (paths.data_paths) unless it is there: by process 0, or
  by every process when the workdir is a bucket's mirror (which only its own host sees); all wait for it."""
  if not config.data.demo:
    return
  if jax.process_index() == 0 or remote.find(workdir) is not None:
    ensure(pathlib.Path(workdir) / paths.DEMO_DATA_DIR, nway=config.data.nway, n_pairs=config.data.max_pairs)
  distributed.barrier("demo data written")
