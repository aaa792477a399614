"""The config blocks that configs/colbert.py and configs/dpr.py share (as big_vision's configs/common.py).

config_flags loads a config by its file path, and `configs` is not a package that is installed, so the recipes
load this file by its path too: that works from any working directory.
"""

import ml_collections

from pairdistill_jax import config_lib


def parse_arg(arg: str | None, *, batch_size: int, steps: int) -> ml_collections.ConfigDict:
  """A recipe's argument, e.g. `demo,batch_size=16` (config_lib.parse_arg).

  Variants: demo (a tiny random BERT on a synthetic task) and scifact (`make scifact`, with `layers` of
  all-MiniLM-L6-v2); both train 8 queries of nway 8 a step, for 150 and 120 steps. Without them the recipe's
  paper `batch_size` and `steps` apply, with nway 64. Overrides: batch_size, steps, nway, grad_accum, layers.
  demo and scifact are set by the bare words only.
  """
  demo, scifact = (config_lib.has_variant(arg, v) for v in ("demo", "scifact"))
  parsed = config_lib.parse_arg(arg, demo=False, scifact=False, layers="2",
                                batch_size=8 if demo or scifact else batch_size,
                                steps=150 if demo else 120 if scifact else steps,
                                nway=8 if demo or scifact else 64, grad_accum=1)
  parsed.update(demo=demo, scifact=scifact)
  return parsed


def model(**fields) -> dict:
  """The student: the recipe's `fields`, then its precision, rematerialisation, attention kernel and the
  bert-base shape of a random init (unused when init.pretrained is set)."""
  return dict(**fields, dtype="bfloat16", remat="none", attention="auto", bert=config_lib.bert_base())


def init(pretrained: str) -> dict:
  """The weights a run starts from.

  pretrained: a local stanford ColBERT or HF BERT directory (download it beforehand); checkpoint: a workdir of
  ours (e.g. the previous PairDistill round) or such a directory, used instead; tokenizer: a local tokenizer
  directory, by default the one of the weights the run starts from; layers: keep only these layers of the
  initial weights ('' all, '3' three evenly spaced, '0,2,5' those). model.bert's dropout rates apply to any
  init; its shape fields only to a random init (others are refused). A workdir's own newest checkpoint always
  wins: rerunning a command resumes it.
  """
  return dict(pretrained=pretrained, checkpoint="", tokenizer="", layers="")


def optim(*, lr: float, warmup_steps: int) -> dict:
  """Global-norm clipping to clip_norm, then AdamW with the warmup/decay schedule (train/state.optimizer)."""
  return dict(lr=lr, warmup_steps=warmup_steps, clip_norm=2.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)


def train(arg: ml_collections.ConfigDict) -> dict:
  """The training loop, sized by the recipe's argument.

  best_metric: an eval metric whose best checkpoint is kept too; overwrite: delete a workdir's checkpoints
  that hold another model (shapes) and start over, instead of refusing to run.
  """
  return dict(batch_size=arg.batch_size, grad_accum=arg.grad_accum, steps=arg.steps, seed=0, log_every=50,
              checkpoint_every=1_000, keep_checkpoints=3, eval_every=0, best_metric="", overwrite=False)


def add_mesh_and_modes(c: ml_collections.ConfigDict, nway: int) -> None:
  """Sets the mesh and sharding rules, and the settings of the other modes (see config_lib's *_fields):
  benchmark, eval (--mode=evaluate and dev evaluation), mine, teacher (--mode=score) and rounds (--mode=rounds:
  each mines, scores, trains; round 1 trains on data.train if set)."""
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = config_lib.SHARDING_RULES
  c.benchmark = config_lib.benchmark_fields()
  c.eval = config_lib.eval_fields()
  c.mine = config_lib.mine_fields()
  c.teacher = config_lib.teacher_fields(nway, 16)
  c.rounds = dict(count=2)


def apply_demo(c: ml_collections.ConfigDict, **model_fields) -> None:
  """The :demo variant: a tiny random BERT (and the recipe's `model_fields`) on the synthetic task the demo
  writes into WORKDIR/demo_data, evaluated on its dev queries; the mining student is the pointwise teacher."""
  c.model.update(query_maxlen=16, doc_maxlen=48, dtype="float32", bert=config_lib.bert_demo(), **model_fields)
  c.init.pretrained = ""
  c.data.update(demo=True, max_pairs=4)
  c.optim.update(lr=5e-4, warmup_steps=20)
  c.train.update(log_every=10, checkpoint_every=50)
  c.eval.update(config_lib.demo_eval_fields())
  config_lib.demo_teacher_overrides(c)
