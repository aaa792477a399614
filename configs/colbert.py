"""PairDistill ColBERT on MS MARCO (the paper's recipe, DESIGN §2.5).

  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/colbertv2.0 --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=/tmp/demo   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=/tmp/bench --mode=benchmark   # step time, MFU, memory

PairDistill's iterative rounds (mine with the student, score with the teachers, train from it; DESIGN §2.6):
  python -m pairdistill_jax.main --config=configs/colbert.py --workdir=runs/pd --mode=rounds \
      --config.teacher.pointwise.model=/models/ms-marco-MiniLM-L-6-v2 \
      --config.teacher.pairwise.model=/models/duot5-3b-msmarco --config.teacher.mesh.fsdp=8 ...
  python -m pairdistill_jax.main --config=configs/colbert.py:demo --workdir=/tmp/rounds --mode=rounds   # ~2 min on a CPU

Variants and overrides go after the colon: `configs/colbert.py:demo,batch_size=16`. The demo trains a tiny
random BERT on a synthetic task written into WORKDIR/demo_data; its loss falls and its pair agreement rises.
"""

import ml_collections

from pairdistill_jax import config_lib


def get_config(arg=None):
  demo, scifact = (config_lib.has_variant(arg, v) for v in ("demo", "scifact"))
  arg = config_lib.parse_arg(arg, demo=False, scifact=False, layers="2",
                             batch_size=8 if demo or scifact else 32,
                             steps=150 if demo else 120 if scifact else 30_000,
                             nway=8 if demo or scifact else 64, grad_accum=1)
  c = ml_collections.ConfigDict()
  c.model = dict(
      kind="colbert", dim=128, query_maxlen=32, doc_maxlen=180, mask_punctuation=True,
      attend_to_mask_tokens=False, dtype="bfloat16", remat="none", attention="einsum",
      bert=config_lib.bert_base())  # the shape of a random init; unused when init.pretrained is set
  # pretrained: a local stanford ColBERT or HF BERT directory (download colbert-ir/colbertv2.0 beforehand);
  # checkpoint: a workdir of ours (e.g. the previous PairDistill round) or such a directory, used instead;
  # tokenizer: a local tokenizer directory, by default the one of the weights the run starts from;
  # layers: keep only these layers of the initial weights ('' all, '3' three evenly spaced, '0,2,5' those).
  # model.bert's dropout rates apply to any init; its shape fields only to a random init (others are refused).
  # A workdir's own newest checkpoint always wins: rerunning a command resumes it.
  c.init = dict(pretrained="colbert-ir/colbertv2.0", checkpoint="", tokenizer="", layers="")
  c.data = config_lib.data_fields(arg.nway)  # see config_lib.data_fields
  # in_batch_group -1: the whole micro-batch; maxsim_chunk: documents scored at a time (0: all at once).
  c.loss = dict(temperature=1.0, pair_alpha=3.0, kd_weight=1.0, in_batch=True, in_batch_group=4, maxsim_chunk=0)
  c.optim = dict(lr=1e-5, warmup_steps=3_000, clip_norm=2.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)
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
    c.model.update(dim=32, query_maxlen=16, doc_maxlen=48, dtype="float32", bert=config_lib.bert_demo())
    c.init.pretrained = ""
    c.data.update(demo=True, max_pairs=4)
    c.optim.update(lr=5e-4, warmup_steps=20)
    c.train.update(log_every=10, checkpoint_every=50)
    c.eval.update(config_lib.demo_eval_fields())
    config_lib.demo_teacher_overrides(c)
  if scifact:  # `make scifact`: a ColBERT cut from all-MiniLM-L6-v2 (its projection starts random)
    config_lib.scifact_overrides(c, arg.layers)
  return c
