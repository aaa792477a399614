"""Every config section with its defaults (as big_vision's configs/common.py): the one place a field's default is.

configs/colbert.py and configs/dpr.py start from `get_config(arg)` and set only what their student and the paper's
recipe change; `apply_demo` is the :demo variant, configs/scifact.py the :scifact one. Paths may name {workdir}.
"""

from __future__ import annotations

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


def get_config(arg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """All sections at their defaults, sized by the recipe's parsed argument (parse_arg)."""
  c = ml_collections.ConfigDict()
  c.model = model()
  c.init = dict(
      pretrained="",  # a local stanford ColBERT or HF BERT directory (download it beforehand); '' = random init
      checkpoint="",  # a workdir of ours (e.g. the previous round) or such a directory, used instead of pretrained
      tokenizer="",  # a local tokenizer directory ('' = the one of the weights the run starts from)
      layers="",  # keep only these layers of the initial weights: '' all, '3' three evenly spaced, '0,2,5' those
  )  # model.bert's dropout applies to any init, its shape only to a random one; a workdir's own checkpoint wins
  c.data = data(arg.nway)
  c.loss = dict(
      temperature=1.0,  # divides the student's scores before its softmax (the teacher's logits are used as given)
      pair_alpha=1.0,  # weight of the pairwise (PairDistill) loss
      kd_weight=1.0,  # weight of the pointwise KL distillation loss
      in_batch=False,  # add the in-batch contrastive loss
  )
  c.optim = dict(  # global-norm clipping, then AdamW with linear warmup and decay (train/state.optimizer)
      lr=1e-5,  # peak learning rate
      warmup_steps=3_000,  # linear warmup from 0 to lr
      clip_norm=2.0,  # global gradient-norm clip
      weight_decay=0.0,  # AdamW's decoupled weight decay
      b1=0.9, b2=0.999, eps=1e-8,  # Adam's moments and epsilon
  )
  c.train = dict(
      batch_size=arg.batch_size,  # queries per step (all devices)
      grad_accum=arg.grad_accum,  # micro-batches per step (in-batch negatives only within each)
      grad_cache=False,  # cached gradients: in-batch negatives over the global batch, memory of one chunk
      grad_cache_chunk=0,  # queries encoded at a time with grad_cache (with their nway passages; 0: one shard's)
      steps=arg.steps,  # total optimizer steps
      seed=0,  # initialisation and data order
      log_every=50,  # steps between metrics.jsonl / TensorBoard records
      checkpoint_every=1_000,  # steps between checkpoints
      keep_checkpoints=3,  # newest checkpoints kept
      eval_every=0,  # steps between dev evaluations on config.eval (0: none)
      best_metric="",  # an eval metric whose best checkpoint is kept too
      overwrite=False,  # delete a workdir's checkpoints of another model (shapes) instead of refusing to run
  )
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # device mesh axes; one may be -1 (all remaining devices)
  c.sharding_rules = sharding_rules()
  c.benchmark = benchmark()
  c.eval = evaluation()
  c.mine = mine()
  c.teacher = teacher(arg.nway)
  c.rounds = dict(count=2)  # --mode=rounds: each mines, scores, trains; round 1 trains on data.train if set
  return c


def bert_base() -> dict:
  """model.bert: the bert-base-uncased shape of a random init (unused when init.pretrained is set)."""
  return dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
              intermediate_size=3072, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def model() -> dict:
  """The student; its kind's own fields (model.dim, model.pooling, ...) are set by the recipe."""
  return dict(
      kind="",  # the student (students registry), set by the recipe: colbert | dpr | a registered kind
      query_maxlen=32,  # query tokens
      doc_maxlen=180,  # passage tokens
      dtype="bfloat16",  # compute dtype (parameters stay float32)
      remat="none",  # rematerialisation policy of the BERT layers
      attention="auto",  # attention kernel (models/attention.py)
      bert=bert_base(),
  )


def data(nway: int) -> dict:
  """Training data and the input pipeline (data/pipeline.py)."""
  return dict(
      train="",  # PairDistill training lines (JSONL)
      collection="",  # TSV, BEIR corpus.jsonl or a BEIR directory (formats.text_source)
      queries="",  # TSV, BEIR queries.jsonl or a BEIR directory (its queries judged in qrels/<split>.tsv)
      split="train",  # a BEIR directory's qrels split
      title_separator="auto",  # joins title and text; auto: ' | ' for ColBERT (stanford), ' ' for DPR (BEIR)
      nway=nway,  # passages per query in a training example
      max_pairs=16,  # teacher pairs per example
      demo=False,  # the synthetic demo task, written into WORKDIR/demo_data
      skip_bad_lines=False,  # skip (and count) malformed training lines instead of stopping
      store_dir="",  # cache of tokenised stores and compiled lines ('' = pairdistill_store beside the collection)
      tokenize_workers=-1,  # processes building a store (-1: one per CPU)
      num_workers=2,  # threads assembling batches
      prefetch=4,  # batches buffered ahead
      shuffle=True,  # shuffle the training lines each epoch
      same_order_on_every_shard=False,  # every data shard reads the same examples (the original's loader)
      doc_widths="auto",  # passage widths a batch is cut to: auto (64, 128, ... doc_maxlen), '64,128', or off
  )


def sharding_rules() -> list:
  """Logical parameter/activation axis -> mesh axes (docs/design.md §4)."""
  return [("batch", ["data", "fsdp"]), ("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"),
          ("vocab", "tensor")]


def benchmark() -> dict:
  """--mode=benchmark: the step timed on synthetic batches of the config's shapes, from a random init."""
  return dict(
      what="train",  # comma list of train | encode | scaling | teacher
      steps=10,  # timed calls
      warmup=2,  # untimed calls first
      peak_flops=0.0,  # one device's peak FLOP/s for MFU (0: the known chips by device kind)
      encode_batch=256,  # passages per encoding call
      scaling="1,2,4,8",  # device counts of the scaling report
      per_device_batch=0,  # queries per device there (0: train.batch_size / jax.device_count())
      variants="",  # override sets measured after the config: ';' between sets, ',' inside one
      memory_batches="8,16,32",  # what=memory: per-device batches (queries) compiled for each variant
      memory_chunks="1,2",  # what=memory: the two grad-cache chunk sizes (queries)
      memory_budget_gb="H100=80,TPU v4=32,TPU v5e=16",  # what=memory: device memory (GiB) to fit batches into
      memory_steps=2,  # what=memory: timed steps per batch and variant (0: compile only, for big shapes)
      teacher_items=512,  # synthetic texts of the teacher measurement (bench/teacher.py)
      teacher_query_words=8,  # words per synthetic query
      teacher_passage_words=60,  # words per synthetic passage
  )


def search() -> dict:
  """How evaluation and mining encode and search a collection."""
  return dict(
      query_maxlen=0,  # query tokens (0: the model's)
      doc_maxlen=0,  # passage tokens (0: the model's; BEIR: 300)
      batch_size=128,  # texts per encoding call
      chunk_size=16_384,  # passages encoded and saved at a time
      index="auto",  # ColBERT auto|exact|ivfpq (auto: exact up to exact_max_tokens); DPR auto|flat|ivfpq
      nprobe=32,  # IVF cells probed
      faiss_depth=1024,  # IVF-PQ candidates per query token, re-ranked by exact MaxSim
      exact_max_tokens=20_000_000,  # index=auto: exact search up to this many document tokens
      vector_dtype="float32",  # stored corpus vectors: float32 (exact) or float16 (half the size; ~1e-3 off)
      corpus_dir="",  # corpus embeddings ('' = beside the results); mining and evaluation may share it
  )


def evaluation() -> dict:
  """--mode=evaluate and the periodic dev evaluation."""
  return dict(
      collection="",  # TSV collection, or the BEIR dataset directory (format beir)
      queries="",  # TSV queries (BEIR: from the directory)
      qrels="",  # TREC qrels or LoTTE qas.jsonl (BEIR: qrels/<split>.tsv)
      format="tsv",  # tsv (MS MARCO / LoTTE files) | beir
      split="test",  # a BEIR directory's qrels split
      k=1000,  # passages retrieved per query
      drop_self="auto",  # never retrieve the query's own id (auto: for beir, BEIR's convention) | true | false
      metrics="nDCG@10,RR@10,R@50,R@100,R@200,R@1000,Success@5",  # reported metrics
      **search(),
  )


def mine() -> dict:
  """--mode=mine: the top-k passages of each training query (data.queries / data.collection unless set)."""
  return dict(
      queries="",  # '' = data.queries
      collection="",  # '' = data.collection
      output="{workdir}/mine/run.trec",  # the TREC run written
      model="",  # the retriever ('' = the workdir's checkpoint, else init.checkpoint / init.pretrained)
      k=100,  # passages per query
      query_block=16_384,  # queries encoded and searched at a time
      keep_corpus=False,  # keep the corpus embeddings (else deleted, unless a retriever teacher reuses them)
      **search(),
  )


def scorer(name: str, max_length: int, batch_per_device: int) -> dict:
  """One teacher (teacher.pointwise / teacher.pairwise)."""
  return dict(
      scorer=name,  # pointwise: cross_encoder|monot5|retriever; pairwise: duot5|duobert|retriever|pointwise|none
      model="",  # local directory ('' for a retriever: the mining model)
      tokenizer="",  # local tokenizer directory ('' = the model's)
      max_length=max_length,  # tokens per input
      dtype="bfloat16",  # compute dtype
      batch_per_device=batch_per_device,  # rows per batch shard
  )


def teacher(nway: int) -> dict:
  """--mode=score: teacher scores of `run` written as training lines to `output` (docs/design.md §2.6)."""
  return dict(
      run="{workdir}/mine/run.trec",  # the mined run
      queries="",  # '' = data.queries
      collection="",  # '' = data.collection
      output="{workdir}/score/train.jsonl",  # the training lines written
      top_n=100,  # passages of each query scored pointwise
      nway=nway,  # the best nway become the line
      topk=20,  # pairs come from the line's top topk ...
      max_distance=5,  # ... with j - i <= max_distance
      n_pairs=16,  # pairs sampled per line
      seed=0,  # pair sampling
      chunk_queries=1024,  # queries scored and saved at a time (the resume unit)
      bucket_multiple=32,  # inputs padded to multiples of this
      mesh=dict(data=-1, fsdp=1, tensor=1),  # the teachers' own mesh (a 3B duoT5 wants fsdp/tensor axes)
      # scale: a retriever teacher's scores times it are its logits (0: 20 for a cosine retriever, else 1)
      pointwise=dict(scorer("cross_encoder", 180, 128), scale=0.0),
      # retriever: log sigmoid of its own scaled margins; pointwise: log sigmoid of the pointwise margins
      pairwise=dict(scorer("duot5", 360, 16), scale=0.0),
  )


def apply_demo(c: ml_collections.ConfigDict, **model_fields) -> None:
  """The :demo variant: a tiny random BERT (and the recipe's `model_fields`) on the synthetic task written into
  WORKDIR/demo_data, evaluated on its dev queries. The demo has no cross-encoder weights: the mining student is
  the pointwise teacher and its margins the pairwise preferences (the loop runs end to end, no better teacher)."""
  c.model.update(query_maxlen=16, doc_maxlen=48, dtype="float32", **model_fields)
  # A tiny BERT; vocab_size 0: the demo vocabulary's size.
  c.model.bert.update(vocab_size=0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  c.init.pretrained = ""
  c.data.update(demo=True, max_pairs=4)
  c.optim.update(lr=5e-4, warmup_steps=20)
  c.train.update(log_every=10, checkpoint_every=50)
  c.eval.update(collection="{workdir}/demo_data/collection.tsv", queries="{workdir}/demo_data/queries.dev.tsv",
                qrels="{workdir}/demo_data/qrels.dev.tsv", k=100, batch_size=64,
                metrics="nDCG@10,RR@10,R@50,R@100,Success@5")
  c.mine.update(k=40, batch_size=64)
  c.teacher.update(top_n=40, chunk_queries=128, n_pairs=c.data.max_pairs)
  c.teacher.pointwise.update(scorer="retriever", max_length=0, dtype="float32", batch_per_device=16)
  c.teacher.pairwise.update(scorer="pointwise", dtype="float32")
