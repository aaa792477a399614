"""Bucket workdirs (gs://) through the CLI, on a local-backed GCS double (tests/fake_gcs.py): a run trains into
the bucket, resumes on another machine (a fresh mirror) from the bucket alone, exports and evaluates from it; a
live run's lock in the bucket is respected. The mirror's pull/push rules and input staging, in-process."""

import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

import fake_gcs

ROOT = pathlib.Path(__file__).resolve().parents[1]
GLOO_CONNECT_TIMEOUT = re.compile("Gloo context initialization failed|Connect timeout")
ARGS = ["--config=configs/colbert.py:demo", "--workdir=gs://bkt/run", "--config.train.checkpoint_every=2",
        "--config.train.log_every=2", "--config.optim.warmup_steps=1"]


def cli(bucket, cache, *args, returncode=0):
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PAIRDISTILL_CACHE=str(cache))
  result = subprocess.run([sys.executable, "tests/fake_gcs.py", str(bucket), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == returncode, (result.stdout + result.stderr)[-3000:]
  return result.stdout + result.stderr


def train_records(run: pathlib.Path) -> list[dict]:
  return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A bucket run trained to step 4 through the mirror of machine A, then resumed to step 6 on machine B."""
  bucket, cache_a, cache_b = (tmp_path_factory.mktemp(name) for name in ("bucket", "machine_a", "machine_b"))
  first = cli(bucket, cache_a, *ARGS, "--config.train.steps=4")
  resumed = cli(bucket, cache_b, *ARGS, "--config.train.steps=6")
  return bucket, cache_b, first, resumed


def test_training_writes_the_workdir_into_the_bucket_and_resumes_from_it(trained):
  bucket, _, first, resumed = trained
  run = bucket / "bkt" / "run"
  assert "trained up to step 4" in first and "trained up to step 6 (resumed at step 4)" in resumed
  assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["2", "4", "6"]
  assert (run / "checkpoints" / "6" / "commit_success.txt").exists()  # Orbax's GCS commit, not a rename
  assert json.loads((run / "model" / "config.json").read_text())["model"]["kind"] == "colbert"
  assert (run / "model" / "tokenizer" / "vocab.txt").exists()
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  assert [r["step"] for r in train_records(run)] == [2, 4, 6]  # each step once, across the two machines
  assert not (run / ".lock").exists()  # released
  assert not list(run.rglob("pairdistill_store")), "token stores are caches: never pushed"
  assert not (ROOT / "gs:").exists()


def test_export_and_evaluate_read_the_bucket_and_write_into_it(trained, tmp_path):
  bucket, cache, _, _ = trained
  run = bucket / "bkt" / "run"
  out = cli(bucket, cache, *ARGS, "--mode=export")
  assert "exported colbert (step 6) to gs://bkt/run/export: colbert, pylate" in out
  assert (run / "export" / "pylate" / "model.safetensors").exists()
  out = cli(bucket, tmp_path / "machine_c", *ARGS, "--mode=export", "--export_dir=gs://bkt/serving")
  assert "to gs://bkt/serving: colbert, pylate" in out
  assert (bucket / "bkt" / "serving" / "colbert" / "artifact.metadata").exists()
  out = cli(bucket, cache, *ARGS, "--mode=evaluate")
  metrics = json.loads((run / "eval" / "metrics.json").read_text())
  assert f'"nDCG@10": {metrics["metrics"]["nDCG@10"]}' in out
  assert (run / "eval" / "run.trec").stat().st_size > 0
  assert not (run / "eval" / "corpus").exists(), "corpus embeddings are caches: never pushed"


def test_inputs_in_the_bucket_are_staged_and_a_bucket_run_is_a_starting_point(trained, tmp_path):
  """A local workdir trained on data files in the bucket, from the bucket run's checkpoint (init.checkpoint)."""
  bucket, cache, _, _ = trained
  data = "gs://bkt/run/demo_data"
  out = cli(bucket, cache, "--config=configs/colbert.py:demo", f"--workdir={tmp_path / 'local'}",
            "--config.data.demo=False", f"--config.data.train={data}/train.jsonl",
            f"--config.data.collection={data}/collection.tsv", f"--config.data.queries={data}/queries.train.tsv",
            "--config.init.checkpoint=gs://bkt/run", "--config.train.steps=2", "--config.optim.warmup_steps=1")
  first_loss = train_records(bucket / "bkt" / "run")[0]["loss"]
  started = json.loads(out.split("SUMMARY ")[1].splitlines()[0])["first_loss"]
  assert started < first_loss - 0.5, (started, first_loss)  # from the trained bucket run, not from scratch
  staged = {p.name for p in (cache / "staged").glob("*/demo_data/*")}
  assert {"train.jsonl", "collection.tsv", "queries.train.tsv"} <= staged
  assert not (tmp_path / "local" / "demo_data").exists()


def test_a_live_run_s_lock_in_the_bucket_is_respected(tmp_path):
  lock = tmp_path / "bucket" / "bkt" / "run" / ".lock"
  lock.parent.mkdir(parents=True)
  lock.write_text(json.dumps({"host": "tpu-worker-0", "pid": 1, "mode": "train", "since": "now", "token": "x",
                              "beat": time.time()}))
  out = cli(tmp_path / "bucket", tmp_path / "cache", *ARGS, "--config.train.steps=2", returncode=2)
  assert "the workdir gs://bkt/run is in use by --mode=train (pid 1 on tpu-worker-0" in out
  lock.write_text(json.dumps({"host": "tpu-worker-0", "pid": 1, "mode": "train", "since": "then",
                              "token": "x", "beat": time.time() - 3600}))
  out = cli(tmp_path / "bucket", tmp_path / "cache", *ARGS, "--config.train.steps=2")
  assert "Taking over the lock" in out and re.search(r"not refreshed for 36\d\d s", out), out[-2000:]
  assert not lock.exists()


@pytest.mark.slow  # 70 s: two jax.distributed processes
def test_two_hosts_train_into_one_bucket_each_through_its_own_mirror(tmp_path):
  """Two processes with separate caches (as two hosts): each generates the demo data into its own mirror, both
  read the checkpoints from the bucket, only process 0 pushes."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  for _ in range(2):  # gloo's 30 s connect timeout can strike a loaded machine: one rerun, from scratch
    shutil.rmtree(tmp_path, ignore_errors=True)
    with socket.socket() as free:
      free.bind(("127.0.0.1", 0))
      port = free.getsockname()[1]
    hosts = [subprocess.Popen(
        [sys.executable, "tests/fake_gcs.py", str(tmp_path / "bucket"), *ARGS, "--config.train.steps=4",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=dict(env, PAIRDISTILL_CACHE=str(tmp_path / f"host{i}")), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [host.communicate(timeout=900)[0] for host in hosts]
    if not any(GLOO_CONNECT_TIMEOUT.search(out) for out in outputs):
      break
  assert [host.returncode for host in hosts] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
  run = tmp_path / "bucket" / "bkt" / "run"
  assert [r["step"] for r in train_records(run)] == [2, 4]
  assert (run / "checkpoints" / "4" / "commit_success.txt").exists()
  for i in range(2):
    assert (tmp_path / f"host{i}" / "mirrors" / "gs" / "bkt" / "run" / "demo_data" / "train.jsonl").exists()
  assert not (tmp_path / "host1" / "mirrors" / "gs" / "bkt" / "run" / "metrics.jsonl").exists()


def test_a_bucket_workdir_without_its_client_is_one_line():
  if importlib.util.find_spec("gcsfs"):
    pytest.skip("gcsfs is installed: the CLI would reach the real GCS")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "pairdistill_jax.main", "--config=configs/colbert.py:demo",
                           "--workdir=gs://bkt/run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
  assert "--workdir: gs://bkt/run: the bucket client is not installed" in result.stderr
  assert "pip install -r requirements-gcs.txt" in result.stderr


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  fake_gcs.install(str(tmp_path / "bucket"))
  from pairdistill_jax import remote

  monkeypatch.setattr(remote, "CACHE", tmp_path / "cache")
  return tmp_path / "bucket" / "bkt"


def write(path: pathlib.Path, text: str) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


def test_mirror_pull_and_push(bucket, tmp_path):
  from pairdistill_jax import remote

  write(bucket / "run" / "model" / "config.json", "{}")
  write(bucket / "run" / "checkpoints" / "2" / "state", "arrays")
  write(bucket / "run" / ".lock", "{}")
  mirror = remote.Mirror("gs://bkt/run", tmp_path / "mirror", bucket_only=("checkpoints",))
  write(mirror.local / "left_by_a_dead_run.txt", "not in the bucket")
  mirror.pull()
  assert sorted(str(p.relative_to(mirror.local)) for p in mirror.local.rglob("*") if p.is_file()) == [
      ".mirror.json", "model/config.json"]
  write(mirror.local / "metrics.jsonl", "{}\n")
  write(mirror.local / "eval" / "corpus" / "chunk_0.npy", "vectors")
  remote.mark_not_mirrored(mirror.local / "eval" / "corpus")
  write(mirror.local / "score" / ".chunk_3.json.tmp", "half written")
  (mirror.local / "model" / "config.json").unlink()
  remote.push(mirror.local / "eval")  # finds the mirror from any path inside it
  assert (bucket / "run" / "metrics.jsonl").read_text() == "{}\n"
  assert not (bucket / "run" / "model" / "config.json").exists()  # deleted locally since the pull
  assert not (bucket / "run" / "eval").exists() and not (bucket / "run" / "score").exists()
  assert (bucket / "run" / "checkpoints" / "2" / "state").exists() and (bucket / "run" / ".lock").exists()
  write(bucket / "run" / "metrics.jsonl", "{}\n{}\n")  # changed in the bucket by another machine
  mirror.pull()
  assert (mirror.local / "metrics.jsonl").read_text() == "{}\n{}\n"
  assert (mirror.local / "eval" / "corpus" / "chunk_0.npy").exists()  # caches stay
  assert str(remote.in_bucket(mirror.local / "round_1")) == "gs://bkt/run/round_1"
  write(bucket / "run" / "model" / "bert_config.json", "{}")
  reader = remote.Mirror("gs://bkt/run", tmp_path / "reader", bucket_only=("checkpoints",))
  reader.pull("model")  # what an export beside a training reads
  assert [p.name for p in reader.local.rglob("*") if p.is_file() and p.name != ".mirror.json"] == [
      "bert_config.json"]
  with pytest.raises(ValueError, match="mirrors gs://bkt/run, not gs://bkt/other"):
    remote.Mirror("gs://bkt/other", mirror.local).pull()


def test_staged_inputs_are_local_copies_refreshed_when_the_bucket_changes(bucket):
  from pairdistill_jax import remote

  write(bucket / "data" / "beir" / "corpus.jsonl", '{"_id": "1", "text": "a"}\n')
  write(bucket / "data" / "beir" / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n")
  local = pathlib.Path(remote.staged("gs://bkt/data/beir"))
  assert local.parts[-2:] == ("data", "beir") and (local / "qrels" / "test.tsv").exists()
  assert remote.staged("gs://bkt/data/beir") == str(local)  # staged once
  write(bucket / "data" / "beir" / "corpus.jsonl", '{"_id": "1", "text": "changed"}\n')
  again = pathlib.Path(remote.staged("gs://bkt/data/beir"))
  assert again != local and "changed" in (again / "corpus.jsonl").read_text()
  assert remote.staged("/a/local/path") == "/a/local/path"
  with pytest.raises(FileNotFoundError, match="gs://bkt/missing does not exist"):
    remote.staged("gs://bkt/missing")
