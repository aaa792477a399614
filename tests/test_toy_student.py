"""A third student kind written from scratch in this one file, on the `students.Student` protocol alone (no
built-in kind subclassed, nothing in the package changed): a multi-vector student that mean-pools groups of
`model.group_size` consecutive tokens into one vector each (through its own projection head, L2-normalised),
scored by MaxSim.

The file is also the config file that selects the kind (`--config=tests/test_toy_student.py`): the CLI loads
it before anything else, which registers the kind. The test trains, exports and evaluates it through the CLI,
then recomputes the scores of the evaluation run from the exported files alone: PyTorch `transformers` BERT
and float64 numpy pooling, projection and MaxSim.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from pairdistill_jax import config_lib, io, losses, students
from pairdistill_jax.convert import hf_io
from pairdistill_jax.data.tokenization import DPRTokenizer
from pairdistill_jax.errors import ConfigError
from pairdistill_jax.models import scoring
from pairdistill_jax.models.bert import BertConfig, BertEncoder

ROOT = pathlib.Path(__file__).resolve().parents[1]
KIND = "group_maxsim"
EXPORT_DIR = "group_maxsim"  # DIRECTORY/group_maxsim: an HF BERT directory plus the head
HEAD_FILE = "head.safetensors"
SETTINGS_FILE = "group_maxsim.json"
STEPS = 30


def group_mask(mask_BxL: jnp.ndarray, group_size: int) -> jnp.ndarray:
  """[B, ceil(L/g)] int32: 1 for a group holding at least one attended token."""
  pad = -mask_BxL.shape[1] % group_size
  mask_BxVxG = jnp.pad(mask_BxL, ((0, 0), (0, pad))).reshape(mask_BxL.shape[0], -1, group_size)
  return (mask_BxVxG.max(axis=-1) > 0).astype(jnp.int32)


class GroupMaxSim(nn.Module):
  """BERT -> mean of each group of `group_size` attended token vectors -> Dense H->dim with bias -> L2-normalise.
  A group without attended tokens is the zero vector (a query's adds 0 to every MaxSim score)."""

  bert_config: BertConfig
  dim: int
  group_size: int
  dtype: Any = jnp.float32
  remat: str = "none"
  attention: str = "auto"

  def setup(self):
    self.bert = BertEncoder(self.bert_config, dtype=self.dtype, remat=self.remat, attention=self.attention)
    self.head = nn.Dense(
        self.dim, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))

  def _encode(self, ids_BxL, mask_BxL, deterministic):
    hidden_BxLxH, _ = self.bert(ids_BxL, mask_BxL, deterministic=deterministic)
    batch, length, hidden = hidden_BxLxH.shape
    pad = -length % self.group_size
    weights_BxLx1 = jnp.pad(mask_BxL, ((0, 0), (0, pad)))[..., None].astype(jnp.float32)
    hidden_BxLxH = jnp.pad(hidden_BxLxH.astype(jnp.float32), ((0, 0), (0, pad), (0, 0))) * weights_BxLx1
    sums_BxVxH = hidden_BxLxH.reshape(batch, -1, self.group_size, hidden).sum(axis=2)
    counts_BxVx1 = weights_BxLx1.reshape(batch, -1, self.group_size, 1).sum(axis=2)
    projected_BxVxD = self.head(sums_BxVxH / jnp.maximum(counts_BxVx1, 1.0))
    # Empty groups are normalised from ones (the norm's gradient at 0 is NaN), then zeroed.
    vectors_BxVxD = scoring.l2_normalize(jnp.where(counts_BxVx1 > 0, projected_BxVxD, 1.0))
    return jnp.where(counts_BxVx1 > 0, vectors_BxVxD, 0.0)

  def encode_query(self, ids_BxL, mask_BxL, *, deterministic: bool = True):
    return self._encode(ids_BxL, mask_BxL, deterministic)

  def encode_doc(self, ids_BxL, mask_BxL, *, deterministic: bool = True):
    return self._encode(ids_BxL, mask_BxL, deterministic)

  def __call__(self, q_ids, q_mask, d_ids, d_mask, *, deterministic: bool = True):
    return (self.encode_query(q_ids, q_mask, deterministic=deterministic),
            self.encode_doc(d_ids, d_mask, deterministic=deterministic))


class GroupMaxSimStudent(students.Student):
  kind = KIND
  multi_vector = True
  title_separator = " "

  def validate(self, config, micro_batch):
    if config.model.group_size < 1:
      raise ConfigError(f"model.group_size must be >= 1, got {config.model.group_size}")
    group = self.score_group(config, micro_batch)
    if not (group >= 1 and micro_batch % group == 0):
      raise ConfigError(f"loss.in_batch_group={config.loss.in_batch_group} must divide the micro-batch {micro_batch}")

  def module(self, model_config, bert_config, *, dtype, remat, attention):
    return GroupMaxSim(bert_config, dim=model_config.dim, group_size=model_config.group_size, dtype=dtype,
                       remat=remat, attention=attention)

  def tokenizer(self, hf_tokenizer, model_config, *, query_maxlen, doc_maxlen):
    return DPRTokenizer(hf_tokenizer, query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)

  def describe(self, model_config):
    return f", dim {model_config.dim}, groups of {model_config.group_size} tokens"

  def score_group(self, config, micro_batch):
    if not config.loss.in_batch:
      return 1
    return micro_batch if config.loss.in_batch_group == -1 else config.loss.in_batch_group

  def loss(self, q, d, batch, config):
    batch_size, nway, _ = batch["d_ids"].shape
    d_BxNxVxD = d.reshape(batch_size, nway, -1, d.shape[-1])
    d_mask_BxNxV = group_mask(batch["d_mask"].reshape(batch_size * nway, -1), config.model.group_size)
    d_mask_BxNxV = d_mask_BxNxV.reshape(batch_size, nway, -1)
    group = self.score_group(config, batch_size)
    scores_BxGN = scoring.grouped_scores(scoring.maxsim, q, d_BxNxVxD, d_mask_BxNxV, group_size=group)
    loss_cfg = config.loss
    return losses.colbert_loss(scoring.own_block(scores_BxGN, nway, group),
                               scores_BxGN if loss_cfg.in_batch else None, batch,
                               temperature=loss_cfg.temperature, pair_alpha=loss_cfg.pair_alpha,
                               in_batch_group=group, kd_weight=loss_cfg.kd_weight)

  def import_params(self, model_config, directory, bert, extra):
    return {"bert": bert}  # the head starts random

  def export(self, directory, bert_config, params, tokenizer_dir, model_config):
    params = nn.meta.unbox(params)
    head = params["head"]
    with io.atomic_directory(pathlib.Path(directory)) as tmp:
      hf_io.export_bert(tmp / EXPORT_DIR, bert_config, params["bert"], tokenizer_dir=tokenizer_dir)
      hf_io.write_safetensors(tmp / EXPORT_DIR / HEAD_FILE, {"weight": np.asarray(head["kernel"]).T,
                                                              "bias": np.asarray(head["bias"])})
      settings = {name: model_config[name] for name in ("group_size", "dim", "query_maxlen", "doc_maxlen")}
      (tmp / EXPORT_DIR / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
    return pathlib.Path(directory)

  def encoder_settings(self, module, tokenizer, normalize):
    return {"normalize": True, "group_size": module.group_size}

  def doc_vector_mask(self, module, tokens):
    return np.asarray(group_mask(jnp.asarray(tokens["mask"]), module.group_size))

  def scoring_flops(self, config, micro_batch, group):
    model_cfg = config.model
    vectors = -(-model_cfg.query_maxlen // model_cfg.group_size) * -(-model_cfg.doc_maxlen // model_cfg.group_size)
    return 2.0 * config.train.batch_size * group * config.data.nway * vectors * model_cfg.dim


students.register(GroupMaxSimStudent())


def get_config(arg=None):
  """configs/colbert.py's demo (in-batch negatives, groups of 4 queries) with this kind."""
  config = config_lib.load_config(f"{ROOT / 'configs' / 'colbert.py'}:demo")
  config.model.update(kind=KIND)
  config.model.group_size = 4
  config.train.steps = STEPS
  return config


def run_main(workdir, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--config={__file__}",
                           f"--workdir={workdir}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def read_tsv(path: pathlib.Path) -> dict[str, str]:
  return dict(line.split("\t") for line in path.read_text().splitlines())


class ExportedModel:
  """The exported student recomputed from its files: PyTorch BERT hidden states, then float64 numpy."""

  def __init__(self, directory: pathlib.Path):
    import safetensors.numpy  # noqa: PLC0415
    import transformers  # noqa: PLC0415 (torch is slow to import)

    self.settings = json.loads((directory / SETTINGS_FILE).read_text())
    self.bert = transformers.BertModel.from_pretrained(directory).eval()
    self.tokenizer = transformers.BertTokenizerFast.from_pretrained(directory)
    head = safetensors.numpy.load_file(str(directory / HEAD_FILE))
    self.weight_DxH, self.bias_D = head["weight"].astype(np.float64), head["bias"].astype(np.float64)

  def vectors(self, text: str, maxlen: int) -> np.ndarray:
    """[groups, dim]: `[CLS] text [SEP]` cut to `maxlen` tokens, each run of group_size tokens mean-pooled."""
    import torch  # noqa: PLC0415

    ids = self.tokenizer(text, truncation=True, max_length=maxlen)["input_ids"]
    with torch.no_grad():
      hidden_LxH = self.bert(torch.tensor([ids]))[0][0].numpy().astype(np.float64)
    size = self.settings["group_size"]
    pooled_VxH = np.stack([hidden_LxH[start:start + size].mean(axis=0) for start in range(0, len(ids), size)])
    projected_VxD = pooled_VxH @ self.weight_DxH.T + self.bias_D
    return projected_VxD / np.linalg.norm(projected_VxD, axis=1, keepdims=True)

  def score(self, query: str, doc: str) -> float:
    similarities = self.vectors(query, self.settings["query_maxlen"]) @ self.vectors(doc, self.settings["doc_maxlen"]).T
    return float(similarities.max(axis=1).sum())


def test_a_kind_written_from_scratch_trains_exports_and_evaluates(tmp_path):
  summary = json.loads(run_main(tmp_path).split("SUMMARY ")[1])
  assert summary["steps"] == STEPS and summary["last_loss"] < summary["first_loss"]
  assert f"exported {KIND} (step {STEPS})" in run_main(tmp_path, "--mode=export")
  metrics = json.loads(run_main(tmp_path, "--mode=evaluate").split("METRICS ")[1])
  assert metrics["nDCG@10"] > 0

  model = ExportedModel(tmp_path / "export" / EXPORT_DIR)
  assert model.settings == {"group_size": 4, "dim": 32, "query_maxlen": 16, "doc_maxlen": 48}
  queries = read_tsv(tmp_path / "demo_data" / "queries.dev.tsv")
  collection = read_tsv(tmp_path / "demo_data" / "collection.tsv")
  ranked: dict[str, list[tuple[str, float]]] = {}
  for line in (tmp_path / "eval" / "run.trec").read_text().splitlines():
    qid, _, docid, _, score, _ = line.split()
    ranked.setdefault(qid, []).append((docid, float(score)))
  for qid in sorted(ranked)[:3]:
    got = [score for _, score in ranked[qid][:5]]
    expected = [model.score(queries[qid], collection[docid]) for docid, _ in ranked[qid][:5]]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
