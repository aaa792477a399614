"""Platform installs (README: Installing for accelerators): each requirements file resolves, with pip's dry run, to
jax with the right plugin and exactly one FAISS build; pyproject's extras say the same; the Make targets install one
file in one pip command; and `make install-gpu` repairs an environment where faiss-cpu shadows the GPU build."""

import json
import pathlib
import re
import socket
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parent.parent
PLATFORM_FILES = {"cpu": "requirements.txt", "gpu": "requirements-gpu.txt", "tpu": "requirements-tpu.txt"}
# What `make venv` installs for the CPU (the test dependencies pin torch to the CPU build); the others: runtime only.
RESOLVED = {"cpu": ["requirements.txt", "requirements-test.txt"], "gpu": ["requirements-gpu.txt"],
            "tpu": ["requirements-tpu.txt"]}
FAISS = {"cpu": "faiss-cpu", "gpu": "faiss-gpu", "tpu": "faiss-cpu"}
PLUGIN = {"cpu": None, "gpu": "jax-cuda12-plugin", "tpu": "libtpu"}
# Every linux wheel tag the resolved packages use (pip matches --platform exactly).
PLATFORM_TAGS = ["manylinux_2_35_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                 "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
OTHER_PYTHON = "3.12" if sys.version_info[:2] == (3, 11) else "3.11"


@pytest.fixture(scope="module")
def pypi():
  try:
    socket.create_connection(("pypi.org", 443), timeout=10).close()
  except OSError as e:
    pytest.skip(f"pypi.org unreachable ({e}): resolution needs the package index")


def resolve(tmp_path: pathlib.Path, files: list[str], python: str | None = None) -> dict[str, str]:
  """{name: version} that `pip install -r FILE ...` would install into an empty environment (a dry run)."""
  report = tmp_path / "report.json"
  args = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
          "--report", str(report)]
  if python:
    args += ["--target", str(tmp_path / "target"), "--python-version", python, "--only-binary=:all:"]
    args += [f"--platform={tag}" for tag in PLATFORM_TAGS]
  for f in files:
    args += ["-r", f]
  result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"pip could not resolve {files}:\n{result.stderr[-3000:]}"
  return {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"]
          for i in json.loads(report.read_text())["install"]}


def check_resolution(platform: str, names: dict[str, str]):
  faiss = sorted(n for n in names if n.startswith("faiss"))
  assert faiss == [FAISS[platform]], f"{platform}: FAISS builds {faiss}; want exactly {FAISS[platform]}"
  assert "jax" in names and names["jaxlib"] == names["jax"]
  plugins = {p for p in PLUGIN.values() if p} & names.keys()
  assert plugins == ({PLUGIN[platform]} if PLUGIN[platform] else set()), f"{platform}: plugins {plugins}"
  if platform == "gpu":
    assert names["jax-cuda12-plugin"] == names["jax"]
  assert ({"gcsfs", "google-cloud-storage"} <= names.keys()) == (platform == "tpu"), platform
  if platform == "cpu":
    assert names["torch"].split("+")[0] == "2.13.0"
  else:
    assert "torch" not in names, f"{platform}: the runtime pulls torch {names['torch']}"


@pytest.mark.parametrize("platform", sorted(PLATFORM_FILES))
def test_platform_resolves(platform, tmp_path, pypi):
  check_resolution(platform, resolve(tmp_path, RESOLVED[platform]))


@pytest.mark.slow
@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_platform_resolves_other_python(platform, tmp_path, pypi):
  """The accelerator files resolve for the other Python too (GPU machines: 3.12, this one: 3.11)."""
  check_resolution(platform, resolve(tmp_path, RESOLVED[platform], python=OTHER_PYTHON))


def read_requirements(name: str) -> set[str]:
  """The requirement strings of a requirements file, following `-r` lines."""
  out = set()
  for line in (ROOT / name).read_text().splitlines():
    line = line.split("#")[0].strip()
    if line.startswith("-r"):
      out |= read_requirements(line[2:].strip())
    elif line:
      out.add(str(Requirement(line)))
  return out


def test_extras_mirror_requirement_files():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())
  assert project["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements-base.txt"]
  base = read_requirements("requirements-base.txt")
  assert not any(r.startswith("faiss") for r in base)
  extras = project["project"]["optional-dependencies"]
  assert sorted(extras) == sorted([*PLATFORM_FILES, "gcs"])
  for platform, name in PLATFORM_FILES.items():
    assert base | {str(Requirement(r)) for r in extras[platform]} == read_requirements(name), platform
  assert {str(Requirement(r)) for r in extras["gcs"]} == read_requirements("requirements-gcs.txt")


def make_dry_run(*args: str) -> list[str]:
  result = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


@pytest.mark.parametrize("platform", sorted(PLATFORM_FILES))
def test_make_targets_install_one_file_in_one_command(platform, tmp_path):
  venv = tmp_path / "venv"
  lines = make_dry_run(f"install-{platform}", f"VENV={venv}")
  installs = [l for l in lines if re.search(r"pip install .*-r ", l)]
  assert len(installs) == 1 and installs[0].endswith(f"-r {PLATFORM_FILES[platform]}"), installs
  uninstall = next(i for i, l in enumerate(lines) if "pip uninstall" in l)
  assert {"faiss-cpu", "faiss-gpu", "faiss-gpu-cu12"} <= set(lines[uninstall].split())
  assert uninstall < lines.index(installs[0])
  # Once a venv is installed for a platform, `make venv` (test, demo) installs that platform's file.
  venv.mkdir()
  if platform != "cpu":
    (venv / ".platform").write_text(f"{platform}\n")
  installs = [l for l in make_dry_run("venv", f"VENV={venv}") if re.search(r"pip install .*-r ", l)]
  assert installs == [f"{venv}/bin/python -m pip install -q -r {PLATFORM_FILES[platform]} -r requirements-test.txt"]


@pytest.mark.slow
def test_install_gpu_repairs_shadowed_faiss(tmp_path):
  """The old README order (faiss-cpu, then faiss-gpu-cu12) breaks `import faiss`; `make install-gpu` repairs it.

  The GPU set's FAISS line with its CUDA libraries (about 850 MB of wheels) and a CPU jax stand in for the whole
  of requirements-gpu.txt (jax[cuda12]'s CUDA libraries are several GB); its resolution is test_platform_resolves.
  """
  venv = tmp_path / "venv"
  python = venv / "bin" / "python"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)

  def run(*args: str, check=True) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1200, check=check)

  run(str(python), "-m", "pip", "install", "-q", "faiss-cpu==1.15.1")
  run(str(python), "-m", "pip", "install", "-q", "faiss-gpu-cu12==1.14.1.post1")
  broken = run(str(python), "-c", "import faiss", check=False)
  assert broken.returncode != 0 and "delete_GpuResourcesVector" in broken.stderr, broken.stderr[-2000:]

  faiss_line = next(r for r in read_requirements("requirements-gpu.txt") if r.startswith("faiss"))
  reqs = tmp_path / "requirements-gpu-small.txt"
  reqs.write_text(f"jax>=0.10\n{faiss_line}\n")
  result = run("make", "install-gpu", f"VENV={venv}", f"REQS_gpu={reqs}", check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  assert (venv / ".platform").read_text().strip() == "gpu"
  check = run(str(python), "-c", "import faiss, importlib.metadata as m; print(faiss.__version__, "
              "hasattr(faiss, 'StandardGpuResources'), "
              "sorted(d.name for d in m.distributions() if d.name.startswith('faiss')))")
  version, gpu, dists = check.stdout.split(" ", 2)
  assert gpu == "True" and dists.strip() == "['faiss-gpu']", check.stdout
