"""PairDistill DPR on MS MARCO (the paper's recipe, DESIGN §2.5).

  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/bert-base-uncased --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/demo_dpr   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=/tmp/bench --mode=benchmark   # step time, MFU, memory

PairDistill's iterative rounds (mine with the student, score with the teachers, train from it; DESIGN §2.6):
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=runs/pd --mode=rounds \
      --config.teacher.pointwise.model=/models/ms-marco-MiniLM-L-6-v2 \
      --config.teacher.pairwise.model=/models/duot5-3b-msmarco --config.teacher.mesh.fsdp=8 ...
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/rounds --mode=rounds   # ~2 min on a CPU

The paper's pointwise-only baseline: `--config.loss.pair_alpha=0 --config.loss.temperature=10`.
One epoch of the 808,731 released training lines at 36 queries per step is 22,465 steps.
"""

import ml_collections

from pairdistill_jax import config_lib


def get_config(arg=None):
  demo, scifact = (config_lib.has_variant(arg, v) for v in ("demo", "scifact"))
  arg = config_lib.parse_arg(arg, demo=False, scifact=False, layers="2",
                             batch_size=8 if demo or scifact else 36,
                             steps=150 if demo else 120 if scifact else 22_465,
                             nway=8 if demo or scifact else 64, grad_accum=1)
  c = ml_collections.ConfigDict()
  # normalize: L2-normalised vectors (cosine scores, as sentence-transformers models with a Normalize module).
  c.model = dict(kind="dpr", pooling="cls", shared_towers=False, normalize=False, query_maxlen=64, doc_maxlen=128,
                 dtype="bfloat16", remat="none", attention="einsum", bert=config_lib.bert_base())
  c.init = dict(pretrained="bert-base-uncased", checkpoint="", tokenizer="", layers="")  # see configs/colbert.py
  c.data = config_lib.data_fields(arg.nway)  # see config_lib.data_fields
  # in_batch (with kd_weight 0, pair_alpha 0: the contrastive control) and dpr_workers: see losses.dpr_loss.
  c.loss = dict(temperature=1.0, pair_alpha=1.0, kd_weight=1.0, in_batch=False, dpr_workers=0)
  c.optim = dict(lr=3e-5, warmup_steps=10_000, clip_norm=2.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)
  c.train = dict(batch_size=arg.batch_size, grad_accum=arg.grad_accum, steps=arg.steps, seed=0,
                 log_every=50, checkpoint_every=1_000, keep_checkpoints=3, eval_every=0,
                 best_metric="", overwrite=False)
  # best_metric: an eval metric whose best checkpoint is kept too; overwrite: delete a workdir's checkpoints
  # that hold another model (shapes) and start over, instead of refusing to run.
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = config_lib.SHARDING_RULES
  c.benchmark = config_lib.benchmark_fields()  # --mode=benchmark, see config_lib.benchmark_fields
  c.eval = config_lib.eval_fields()  # --mode=evaluate and dev evaluation, see config_lib.eval_fields
  c.mine = config_lib.mine_fields()  # --mode=mine, see config_lib.mine_fields
  c.teacher = config_lib.teacher_fields(arg.nway, 16)  # --mode=score, see config_lib.teacher_fields
  c.rounds = dict(count=2)  # --mode=rounds: each mines, scores, trains (round 1 trains on data.train if set)

  if demo:
    # Mean pooling: a randomly initialised BERT's [CLS] vector hardly depends on the input.
    c.model.update(query_maxlen=16, doc_maxlen=48, dtype="float32", pooling="mean",
                   bert=config_lib.bert_demo())
    c.init.pretrained = ""
    c.data.update(demo=True, max_pairs=4)
    c.optim.update(lr=5e-4, warmup_steps=20)
    c.train.update(log_every=10, checkpoint_every=50)
    c.eval.update(config_lib.demo_eval_fields())
    config_lib.demo_teacher_overrides(c)
  if scifact:  # `make scifact`: a bi-encoder cut from all-MiniLM-L6-v2, pooled as it is (mean), one tower
    config_lib.scifact_overrides(c, arg.layers)
    c.model.update(pooling="mean", shared_towers=True, normalize=True)
    c.loss.temperature = 1 / 20  # cosine scores x 20, the teacher's scale (teacher.pointwise.scale)
  return c
