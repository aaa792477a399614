"""PairDistill DPR on MS MARCO (the paper's recipe, DESIGN §2.5).

  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/bert-base-uncased --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/demo_dpr   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=/tmp/bench --mode=benchmark  # MFU, memory

PairDistill's iterative rounds (mine with the student, score with the teachers, train from it; DESIGN §2.6):
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=runs/pd --mode=rounds \
      --config.teacher.pointwise.model=/models/ms-marco-MiniLM-L-6-v2 \
      --config.teacher.pairwise.model=/models/duot5-3b-msmarco --config.teacher.mesh.fsdp=8 ...
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/rounds --mode=rounds   # ~2 min on a CPU

Variants and overrides as in configs/colbert.py (`:demo`, `:scifact,layers=2`, `batch_size=16`, ...).
The paper's pointwise-only baseline: `--config.loss.pair_alpha=0 --config.loss.temperature=10`.
One epoch of the 808,731 released training lines at 36 queries per step is 22,465 steps.
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
  arg = common.parse_arg(arg, batch_size=36, steps=22_465)
  c = ml_collections.ConfigDict()
  # normalize: L2-normalised vectors (cosine scores, as sentence-transformers models with a Normalize module).
  c.model = common.model(kind="dpr", pooling="cls", shared_towers=False, normalize=False, query_maxlen=64,
                         doc_maxlen=128)
  c.init = common.init(pretrained="bert-base-uncased")
  c.data = config_lib.data_fields(arg.nway)  # see config_lib.data_fields
  # in_batch (with kd_weight 0, pair_alpha 0: the contrastive control) and dpr_workers: see losses.dpr_loss.
  c.loss = dict(temperature=1.0, pair_alpha=1.0, kd_weight=1.0, in_batch=False, dpr_workers=0)
  c.optim = common.optim(lr=3e-5, warmup_steps=10_000)
  c.train = common.train(arg)
  common.add_mesh_and_modes(c, arg.nway)

  if arg.demo:  # mean pooling: a randomly initialised BERT's [CLS] vector hardly depends on the input
    common.apply_demo(c, pooling="mean")
  if arg.scifact:  # `make scifact`: a bi-encoder cut from all-MiniLM-L6-v2, pooled as it is (mean), one tower
    config_lib.scifact_overrides(c, arg.layers)
    c.model.update(pooling="mean", shared_towers=True, normalize=True)
    c.loss.temperature = 1 / 20  # cosine scores x 20, the teacher's scale (teacher.pointwise.scale)
  return c
