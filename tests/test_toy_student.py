"""A third student kind defined in this one file, without touching the package: a bi-encoder that max-pools its
token vectors (DPR's towers and loss; exported as sentence-transformers with max pooling).

The file is also the config file that selects the kind (`--config=tests/test_toy_student.py`): the CLI loads
it before anything else, which registers the kind. The test trains, exports and evaluates it through the CLI
and checks the export against sentence-transformers' own max pooling.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from pairdistill_jax import students
from pairdistill_jax.students import dpr

ROOT = pathlib.Path(__file__).resolve().parents[1]


class MaxPooledDPR(dpr.DPR):
  """DPR towers whose vector is the elementwise max over the attended token vectors."""

  def pool(self, hidden_BxLxH, mask_BxL):
    hidden_BxLxH = hidden_BxLxH.astype(jnp.float32)
    return jnp.where(mask_BxL[..., None] > 0, hidden_BxLxH, -1e9).max(axis=1)


class MaxPooledStudent(dpr.DPRStudent):
  kind = "dpr_max"
  poolings = ("max",)

  def module(self, model_config, bert_config, *, dtype, remat, attention):
    return MaxPooledDPR(bert_config, pooling="max", shared_towers=model_config.shared_towers,
                        normalize=model_config.normalize, dtype=dtype, remat=remat, attention=attention)


students.register(MaxPooledStudent())


def get_config(arg=None):
  """configs/dpr.py's demo with this kind."""
  spec = importlib.util.spec_from_file_location("dpr_recipe", ROOT / "configs" / "dpr.py")
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  config = recipe.get_config("demo")
  config.model.update(kind="dpr_max", pooling="max")
  config.train.steps = 30
  return config


def run_main(workdir, *args):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--config={__file__}",
                           f"--workdir={workdir}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_a_kind_defined_outside_the_package_trains_exports_and_evaluates(tmp_path):
  import sentence_transformers  # noqa: PLC0415 (torch is slow to import)

  from pairdistill_jax import checkpoint  # noqa: PLC0415
  from pairdistill_jax.retrieval import encoders  # noqa: PLC0415

  summary = json.loads(run_main(tmp_path).split("SUMMARY ")[1])
  assert summary["steps"] == 30 and summary["last_loss"] < summary["first_loss"]
  assert "exported dpr_max (step 30)" in run_main(tmp_path, "--mode=export")
  metrics = json.loads(run_main(tmp_path, "--mode=evaluate").split("METRICS ")[1])
  assert metrics["nDCG@10"] > 0

  trained = checkpoint.load_trained(tmp_path)
  ours = encoders.from_trained(trained)
  assert isinstance(ours.module, MaxPooledDPR) and ours.settings()["pooling"] == "max"
  texts = [line.split("\t")[1] for line in (tmp_path / "demo_data" / "collection.tsv").read_text().splitlines()[:4]]
  for directory, which in (("query_encoder", "query"), ("passage_encoder", "doc")):
    pooling = json.loads((tmp_path / "export" / directory / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_max_tokens"] and not pooling["pooling_mode_mean_tokens"]
    model = sentence_transformers.SentenceTransformer(str(tmp_path / "export" / directory), device="cpu")
    tokens = (ours.tokenizer.encode_queries if which == "query" else ours.tokenizer.encode_docs)(texts)
    np.testing.assert_allclose(model.encode(texts), ours.encode(which, tokens["ids"], tokens["mask"]),
                               rtol=1e-4, atol=1e-4)
