"""PairDistill DPR on MS MARCO (the paper's recipe, DESIGN §2.5).

  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=gs://bucket/run \
      --config.init.pretrained=/models/bert-base-uncased --config.data.train=pairs.train.jsonl \
      --config.data.collection=collection.tsv --config.data.queries=queries.train.tsv
  python -m pairdistill_jax.main --config=configs/dpr.py:demo --workdir=/tmp/demo_dpr   # minutes on a CPU
  python -m pairdistill_jax.main --config=configs/dpr.py --workdir=/tmp/bench --mode=benchmark   # step time, MFU, memory

The paper's pointwise-only baseline: `--config.loss.pair_alpha=0 --config.loss.temperature=10`.
One epoch of the 808,731 released training lines at 36 queries per step is 22,465 steps.
"""

import ml_collections

from pairdistill_jax import config_lib


def get_config(arg=None):
  demo = config_lib.has_variant(arg, "demo")
  arg = config_lib.parse_arg(arg, demo=False, batch_size=8 if demo else 36, steps=150 if demo else 22_465,
                             nway=8 if demo else 64, grad_accum=1)
  c = ml_collections.ConfigDict()
  c.model = dict(kind="dpr", pooling="cls", shared_towers=False, query_maxlen=64, doc_maxlen=128,
                 dtype="bfloat16", remat="none", attention="einsum", bert=config_lib.bert_base())
  c.init = dict(pretrained="bert-base-uncased", checkpoint="", tokenizer="")  # see configs/colbert.py
  # store_dir: where the pre-tokenised stores and compiled training lines are cached (default: a
  # pairdistill_store directory beside the collection); tokenize_workers: processes building a store
  # (-1: one per CPU); num_workers/prefetch: threads assembling batches and batches buffered ahead;
  # same_order_on_every_shard: reproduce the original's loader, where every data-parallel shard read the
  # same examples (with shuffle=False, in file order as there) — see data/pipeline.py.
  c.data = dict(train="", collection="", queries="", nway=arg.nway, max_pairs=16, demo=False,
                skip_bad_lines=False, store_dir="", tokenize_workers=-1, num_workers=2, prefetch=4,
                shuffle=True, same_order_on_every_shard=False)
  c.loss = dict(temperature=1.0, pair_alpha=1.0)
  c.optim = dict(lr=3e-5, warmup_steps=10_000, clip_norm=2.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8)
  c.train = dict(batch_size=arg.batch_size, grad_accum=arg.grad_accum, steps=arg.steps, seed=0,
                 log_every=50, checkpoint_every=1_000, keep_checkpoints=3, eval_every=0,
                 best_metric="")  # best_metric: an eval metric whose best checkpoint is kept too
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding_rules = config_lib.SHARDING_RULES
  # benchmark (--mode=benchmark): the step timed on synthetic batches of this config's shapes, from a random init
  # (no data files, init.pretrained ignored). what: comma list of train|encode|scaling; warmup then steps timed
  # calls; peak_flops: one device's peak FLOP/s for MFU (0: the known chips by device kind); encode_batch:
  # passages per encoding call; scaling: device counts for the scaling report, with per_device_batch queries on
  # each (0: train.batch_size / jax.device_count()); variants: override sets measured after the config itself,
  # ';' between sets, ',' inside one, e.g. 'model.remat=full;loss.maxsim_chunk=64'.
  c.benchmark = dict(what="train", steps=10, warmup=2, peak_flops=0.0, encode_batch=256, scaling="1,2,4,8",
                     per_device_batch=0, variants="")
  # eval: what --mode=evaluate (and the periodic dev evaluation) runs on; paths may use {workdir}.
  # format 'tsv' (MS MARCO / LoTTE files) or 'beir' (collection = the dataset directory, qrels/<split>.tsv);
  # maxlens 0 keep the model's; index auto|flat|ivfpq (auto: flat).
  c.eval = dict(collection="", queries="", qrels="", format="tsv", split="test", k=1000, query_maxlen=0,
                doc_maxlen=0, batch_size=128, chunk_size=16_384,
                metrics="nDCG@10,RR@10,R@50,R@100,R@200,R@1000,Success@5", index="auto", nprobe=32,
                faiss_depth=1024, exact_max_tokens=20_000_000)

  if demo:
    # Mean pooling: a randomly initialised BERT's [CLS] vector hardly depends on the input.
    c.model.update(query_maxlen=16, doc_maxlen=48, dtype="float32", pooling="mean",
                   bert=config_lib.bert_demo())
    c.init.pretrained = ""
    c.data.update(demo=True, max_pairs=4)
    c.optim.update(lr=5e-4, warmup_steps=20)
    c.train.update(log_every=10, checkpoint_every=50)
    c.eval.update(collection="{workdir}/demo_data/collection.tsv", queries="{workdir}/demo_data/queries.dev.tsv",
                  qrels="{workdir}/demo_data/qrels.dev.tsv", k=100, batch_size=64,
                  metrics="nDCG@10,RR@10,R@50,R@100,Success@5")
  return c
