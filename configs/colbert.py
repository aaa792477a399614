"""PairDistill ColBERT on MS MARCO (the paper's recipe, docs/design.md §2.5).

  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/colbertv2.0 --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=/tmp/demo   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=/tmp/bench --mode=benchmark  # MFU, memory

PairDistill's iterative rounds (mine with the student, score with the teachers, train from it; docs/design.md §2.6):
  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=runs/pd --mode=rounds \
      --config.teacher.pointwise.model=/models/ms-marco-MiniLM-L-6-v2 \
      --config.teacher.pairwise.model=/models/duot5-3b-msmarco --config.teacher.mesh.fsdp=8 ...
  python -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=/tmp/rounds --mode=rounds  # 2 min, CPU

Variants and overrides go after the colon: `configs/colbert.py:demo,batch_size=16` (all of them:
configs/common.py parse_arg; every field with its default: common.get_config). The demo trains a tiny random BERT
on a synthetic task written into WORKDIR/demo_data; its loss falls and its pair agreement rises.
`:scifact,layers=2` is `make scifact`'s student (configs/scifact.py).
"""

import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:  # config_flags loads this file by its path: `configs` is importable from the checkout
  sys.path.insert(0, _ROOT)

from configs import common, scifact  # noqa: E402


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=32, steps=30_000)
  c = common.get_config(arg)
  c.model.update(kind="colbert", dim=128, mask_punctuation=True, attend_to_mask_tokens=False)
  c.init.pretrained = "colbert-ir/colbertv2.0"  # download colbert-ir/colbertv2.0 beforehand
  # in_batch_group -1: the whole micro-batch; maxsim_chunk: documents scored at a time (0: all at once).
  c.loss.update(pair_alpha=3.0, in_batch=True, in_batch_group=4, maxsim_chunk=0)
  c.optim.update(lr=1e-5, warmup_steps=3_000)

  if arg.demo:
    common.apply_demo(c, dim=32)
  if arg.scifact:  # `make scifact`: a ColBERT cut from all-MiniLM-L6-v2 (its projection starts random)
    scifact.apply(c, arg.layers)
  return c
