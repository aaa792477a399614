"""PairDistill ColBERT on MS MARCO (the paper's recipe, DESIGN §2.5).

  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/colbertv2.0 --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=/tmp/demo   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=/tmp/bench --mode=benchmark  # MFU, memory

PairDistill's iterative rounds (mine with the student, score with the teachers, train from it; DESIGN §2.6):
  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=runs/pd --mode=rounds \
      --config.teacher.pointwise.model=/models/ms-marco-MiniLM-L-6-v2 \
      --config.teacher.pairwise.model=/models/duot5-3b-msmarco --config.teacher.mesh.fsdp=8 ...
  python -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=/tmp/rounds --mode=rounds  # 2 min, CPU

Variants and overrides go after the colon: `configs/colbert.py:demo,batch_size=16` (all of them:
configs/common.py parse_arg). The demo trains a tiny random BERT on a synthetic task written into
WORKDIR/demo_data; its loss falls and its pair agreement rises. `:scifact,layers=2` is `make scifact`'s student.
"""

import importlib.util
import pathlib

import ml_collections

from pairdistill_jax import config_lib

# The blocks shared with the other recipe, loaded by file path as config_flags loads this file.
_COMMON = importlib.util.spec_from_file_location("configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_COMMON)
_COMMON.loader.exec_module(common)


def get_config(arg=None):
  arg = common.parse_arg(arg, batch_size=32, steps=30_000)
  c = ml_collections.ConfigDict()
  c.model = common.model(kind="colbert", dim=128, query_maxlen=32, doc_maxlen=180, mask_punctuation=True,
                         attend_to_mask_tokens=False)
  c.init = common.init(pretrained="colbert-ir/colbertv2.0")  # download colbert-ir/colbertv2.0 beforehand
  c.data = config_lib.data_fields(arg.nway)  # see config_lib.data_fields
  # in_batch_group -1: the whole micro-batch; maxsim_chunk: documents scored at a time (0: all at once).
  c.loss = dict(temperature=1.0, pair_alpha=3.0, kd_weight=1.0, in_batch=True, in_batch_group=4, maxsim_chunk=0)
  c.optim = common.optim(lr=1e-5, warmup_steps=3_000)
  c.train = common.train(arg)
  common.add_mesh_and_modes(c, arg.nway)

  if arg.demo:
    common.apply_demo(c, dim=32)
  if arg.scifact:  # `make scifact`: a ColBERT cut from all-MiniLM-L6-v2 (its projection starts random)
    config_lib.scifact_overrides(c, arg.layers)
  return c
