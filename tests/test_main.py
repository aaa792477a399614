"""The entry point end to end: the demo configs train, and bad flags give clear one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_main(*args, workdir):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one device, as a user's laptop
  return subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--workdir={workdir}", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def summary(result):
  assert result.returncode == 0, result.stderr[-3000:]
  line = next(l for l in result.stdout.splitlines() if l.startswith("SUMMARY "))
  return json.loads(line[len("SUMMARY "):])


def test_colbert_demo_loss_falls_and_pair_agreement_rises(tmp_path):
  result = run_main("--config=configs/colbert.py:demo", "--config.train.steps=80", workdir=tmp_path)
  s = summary(result)
  assert s["steps"] == 80
  assert s["last_loss"] < 0.8 * s["first_loss"]
  assert s["last_pair_agreement"] > s["first_pair_agreement"] + 0.1
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == list(range(10, 81, 10))
  for key in ("loss_kd", "loss_pair", "loss_ib", "lr", "grad_norm", "queries_per_s", "tokens_per_s",
              "step_time"):
    assert key in records[-1]
  assert any((tmp_path / "tensorboard").iterdir())
  # The trained workdir mines its training queries, then its student scores the run as the teacher.
  small = ["--config=configs/colbert.py:demo", "--config.mine.k=10", "--config.teacher.top_n=10"]
  mined = run_main(*small, "--mode=mine", workdir=tmp_path)
  assert mined.returncode == 0 and "mine: " in mined.stdout, mined.stderr[-3000:]
  scored = run_main(*small, "--mode=score", workdir=tmp_path)
  assert scored.returncode == 0 and "score: " in scored.stdout, scored.stderr[-3000:]
  lines = (tmp_path / "score" / "train.jsonl").read_text().splitlines()
  assert len(lines) == 600 and all(len(json.loads(line)) == 1 + 8 for line in lines)


def test_jax_flags_apply_and_reruns_of_evaluate_keep_earlier_results(tmp_path):
  def evaluate_init(*args):
    result = run_main("--config=configs/colbert.py:demo", "--mode=evaluate", "--init", *args, workdir=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

  evaluate_init("--jax_platforms=cpu", "--jax_default_matmul_precision=float32")
  first = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert first["matmul_precision"] == "float32" and first["model"] == "colbert@init"
  evaluate_init()
  earlier = list((tmp_path / "eval" / "earlier").glob("colbert@init-*/metrics.json"))
  assert len(earlier) == 1 and json.loads(earlier[0].read_text()) == first
  assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["matmul_precision"] == "default"
  evaluate_init("--eval_name=named")
  assert (tmp_path / "eval" / "named" / "metrics.json").exists() and (tmp_path / "eval" / "run.trec").exists()


def test_dpr_demo_runs_to_completion(tmp_path):
  s = summary(run_main("--config=configs/dpr.py:demo", "--config.train.steps=40", workdir=tmp_path))
  assert s["steps"] == 40 and s["last_loss"] < s["first_loss"]


@pytest.mark.parametrize("args, message", [
    (["--config=configs/colbert.py:demo", "--config.model.nonexistent=1"], "unknown config field model.nonexistent\n"),
    (["--config=configs/colbert.py:demo", "--config.optim.lr=1e-4", "--config.train.stepz=3"],
     "error: unknown config field train.stepz (did you mean train.steps?)\n"),
    (["--config=configs/colbert.py:demo", "--config.optim.lr=fast"], "--config.optim.lr=fast"),
    (["--config=configs/colbert.py:demo", "--config.train.batch_size=6"], "loss.in_batch_group=4 must divide"),
    (["--config=configs/dpr.py:demo", "--config.loss.dpr_workers=3"], "loss.dpr_workers=3 must be >= 0"),
    (["--config=configs/colbert.py:demo,bogus=1"], "unknown config argument 'bogus'"),
    (["--config=configs/colbert.py:demo", "--config.mesh.data=3"], "mesh"),
    (["--config=configs/colbert.py:demo", "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
      "--config.train.steps=5"], "error: --mode=train: non-finite loss or gradient at step 1"),
    (["--config=configs/colbert.py:demo", "--config.data.prefetch=-1"], "data.prefetch must be >= 0"),
    (["--config=configs/colbert.py"], "data.train is empty"),
    (["--config=configs/colbert.py:demo", "--mode=export"], "--mode=export"),
    (["--config=configs/colbert.py:demo", "--mode=mine"], "nothing to retrieve with"),
    (["--config=configs/colbert.py:demo", "--mode=score"], "mine it first (--mode=mine)"),
    (["--config=configs/colbert.py:demo", "--mode=score", "--config.teacher.nway=64"],
     "teacher.nway=64 exceeds teacher.top_n=40"),
])
def test_bad_flags_fail_with_a_clear_message(tmp_path, args, message):
  result = run_main(*args, workdir=tmp_path)
  assert result.returncode == 2
  assert message in result.stderr
  assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
  """A tiny TSV collection, queries and training lines, and a file-less directory."""
  root = tmp_path_factory.mktemp("data")
  (root / "collection.tsv").write_text("1\tproteins fold\n2\twater boils\n")
  (root / "queries.tsv").write_text("q1\twhat folds\n")
  (root / "train.jsonl").write_text('["q1", ["1", 1.0], ["2", 0.5]]\n["q1", ["1", "high"]]\n')
  (root / "empty").mkdir()
  return root


def _train_args(root, **fields):
  data = dict(train=root / "train.jsonl", collection=root / "collection.tsv", queries=root / "queries.tsv")
  data.update(fields)
  return ["--config=configs/colbert.py:demo,batch_size=1,nway=2", "--config.data.demo=False", "--config.mesh.data=1",
          "--config.loss.in_batch_group=1",
          *(f"--config.data.{k}={v}" for k, v in data.items())]


@pytest.mark.parametrize("case,message", [
    ("bad_line", "train.jsonl:2: "),  # a FormatError naming file and line
    ("train_is_a_directory", "empty"),  # IsADirectoryError
    ("non_model_directory", "empty"),  # init.pretrained holds no weights
    ("missing_tokenizer", "missing"),
])
def test_data_and_path_errors_in_train_mode_are_one_line(tmp_path, real_data, case, message):
  """Train mode used to print a traceback for every one of these (only mine/score/rounds caught them)."""
  args = {
      "bad_line": _train_args(real_data) + [f"--config.init.tokenizer={real_data / 'tok'}"],
      "train_is_a_directory": _train_args(real_data, train=real_data / "empty") + [
          f"--config.init.tokenizer={real_data / 'tok'}"],
      "non_model_directory": _train_args(real_data) + [f"--config.init.pretrained={real_data / 'empty'}"],
      "missing_tokenizer": _train_args(real_data) + [f"--config.init.tokenizer={real_data / 'missing'}"],
  }[case]
  from pairdistill_jax.data import demo  # noqa: PLC0415

  demo.write_tokenizer(real_data / "tok", ["proteins", "fold", "water", "boils", "what", "folds"])
  result = run_main(*args, workdir=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and message in last, last


@pytest.mark.parametrize("given, expected", [
    ("--xla_force_host_platform_device_count=2",
     "--xla_force_host_platform_device_count=2 --xla_cpu_experimental_ynn_fusion_type="),
    ("--xla_cpu_experimental_ynn_fusion_type=dot", "--xla_cpu_experimental_ynn_fusion_type=dot")])
def test_the_cli_turns_xla_cpu_ynn_fusions_off_unless_told(given, expected):
  """Set before jax loads (README, Performance: they slow corpus encoding on x86); a choice in XLA_FLAGS stays."""
  result = subprocess.run([sys.executable, "-c", "import os, pairdistill_jax.main, jax; jax.devices(); "
                           "print(os.environ['XLA_FLAGS'])"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, XLA_FLAGS=given, JAX_PLATFORMS="cpu"), timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == expected


def test_configs_load_from_any_working_directory(tmp_path):
  """config_flags loads a recipe by its path: `from configs import common` works outside the checkout too."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | dict(XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pairdistill_jax.main", f"--config={ROOT / 'configs' / 'dpr.py'}:demo",
                           f"--workdir={tmp_path / 'run'}", "--mode=export"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: --mode=export: "), result.stderr[-3000:]


def test_a_missing_scifact_folder_is_one_line_saying_what_to_download(tmp_path):
  missing = tmp_path / "scifact"
  result = subprocess.run([sys.executable, str(ROOT / "experiments" / "scifact.py"), f"--workdir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=dict(os.environ, SCIFACT_DATA=str(missing)), capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      f"error: no BEIR folder at {missing}: download BEIR SciFact (https://public.ukp.informatik.tu-darmstadt.de/"
      f"thakur/BEIR/datasets/scifact.zip, md5 5f7d1de60b170fc8027bb7898e2efca1) and unzip it there, or name another "
      f"BEIR folder (SCIFACT_DATA=DIR, make scifact DATA=DIR)"]
  assert not (tmp_path / "run").exists()
