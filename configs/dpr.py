"""PairDistill DPR on MS MARCO (the paper's recipe, docs/design.md §2.5).

  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/bert-base-uncased --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/demo_dpr   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=/tmp/bench --mode=benchmark  # MFU, memory

PairDistill's iterative rounds (mine with the student, score with the teachers, train from it; docs/design.md §2.6):
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=runs/pd --mode=rounds \
      --config.teacher.pointwise.model=/models/ms-marco-MiniLM-L-6-v2 \
      --config.teacher.pairwise.model=/models/duot5-3b-msmarco --config.teacher.mesh.fsdp=8 ...
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/rounds --mode=rounds   # ~2 min on a CPU

Variants and overrides as in configs/colbert.py (`:demo`, `:scifact,layers=2`, `batch_size=16`, ...).
The paper's pointwise-only baseline: `--config.loss.pair_alpha=0 --config.loss.temperature=10`.
One epoch of the 808,731 released training lines at 36 queries per step is 22,465 steps.
"""

import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # config_flags loads this file by its path: `configs` is importable from the checkout
  sys.path.insert(0, _ROOT)

from configs import common, scifact  # noqa: E402


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=36, steps=22_465)
  c = common.get_config(arg)
  # normalize: L2-normalised vectors (cosine scores, as sentence-transformers models with a Normalize module).
  c.model.update(kind="dpr", pooling="cls", shared_towers=False, normalize=False, query_maxlen=64, doc_maxlen=128)
  c.init.pretrained = "bert-base-uncased"
  # in_batch (with kd_weight 0, pair_alpha 0: the contrastive control) and dpr_workers: see losses.dpr_loss.
  c.loss.update(dpr_workers=0)
  c.optim.update(lr=3e-5, warmup_steps=10_000)

  if arg.demo:  # mean pooling: a randomly initialised BERT's [CLS] vector hardly depends on the input
    common.apply_demo(c, pooling="mean")
  if arg.scifact:  # `make scifact`: a bi-encoder cut from all-MiniLM-L6-v2, pooled as it is (mean), one tower
    scifact.apply(c, arg.layers)
    c.model.update(pooling="mean", shared_towers=True, normalize=True)
    c.loss.temperature = 1 / 20  # cosine scores x 20, the teacher's scale (teacher.pointwise.scale)
  return c
