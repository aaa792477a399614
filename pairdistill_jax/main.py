"""Entry point: `python -m pairdistill_jax.main --config=configs/colbert.py[:variant] --workdir=DIR`.

  --mode=train        train the student of the config (default)
  --mode=export       write the workdir's latest checkpoint as PyTorch directories (--export_dir, default
                      WORKDIR/export): stanford ColBERT + PyLate, or sentence-transformers + transformers DPR
  --mode=evaluate     evaluate the workdir's latest checkpoint, or --model_dir (a stanford ColBERT / HF /
                      sentence-transformers directory, --pooling=cls|mean), or with --init the student the
                      config starts from (before training), on config.eval; writes WORKDIR/eval/run.trec
                      and metrics.json (an earlier run moves to eval/earlier/<model>-<time>/; --eval_name=NAME
                      writes WORKDIR/eval/NAME/ instead) and prints the metrics table
  --mode=benchmark    time the train step (and encoding, scaling over devices, variants, the teachers'
                      throughput: config.benchmark) on synthetic batches; prints BENCHMARK {json} lines and
                      appends them to WORKDIR/benchmark.jsonl
  --mode=mine         retrieve the top config.mine.k passages of every training query with the workdir's
                      student (or config.mine.model); writes config.mine.output (a TREC run)
  --mode=score        teacher-score that run (pointwise top-n, pair selection, pairwise) into PairDistill
                      training lines at config.teacher.output; resumable by chunks
  --mode=rounds       PairDistill's iterative rounds (config.rounds.count) in WORKDIR/round_<r>: each mines,
                      scores and trains from the previous student (round 1: from config.init, or it trains
                      on data.train when the config has training lines)

--workdir may be a bucket URL (gs://bucket/run; needs requirements-gcs.txt): checkpoints go to the bucket
directly, every other file through a local mirror (--mirror_dir) pushed to the bucket as the run goes.

Any config field can be overridden: `--config.optim.lr=2e-5 --config.train.batch_size=64`; JAX's flags are
accepted too (`--jax_platforms=cpu`, `--jax_default_matmul_precision=float32`, ...).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import sys
import tempfile
from collections.abc import Callable
from typing import NoReturn

if __name__ == "__main__":  # glibc reads its tunables when a process starts: the CLI re-executes itself once
  from pairdistill_jax import malloc

  malloc.reexec_with_huge_pages()

# XLA:CPU's YNNPACK fusions slow BERT's matrix multiplies on x86 (README, Performance): off unless XLA_FLAGS
# chooses. CPU only; set before jax loads.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if YNN_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {YNN_FLAG}=".strip()

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from pairdistill_jax import config_lib, distributed, paths, remote, students
from pairdistill_jax import workdir as workdir_lib
from pairdistill_jax.data import demo
from pairdistill_jax.data.formats import FormatError
from pairdistill_jax.errors import ConfigError, NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class Args:
  """The flags besides --config, --workdir and --mode (each read by the modes named)."""

  export_dir: str | None = None  # export
  model_dir: str | None = None  # evaluate
  pooling: str | None = None  # evaluate --model_dir
  init: bool = False  # evaluate
  eval_name: str = ""  # evaluate
  mirror_dir: str | None = None  # a bucket --workdir's local mirror

  def command(self, mode: str) -> str:
    """How a one-line error names the command: '--mode=evaluate --init'."""
    if mode == "evaluate" and (self.init or self.model_dir):
      return f"--mode={mode} " + ("--init" if self.init else f"--model_dir={self.model_dir}")
    return f"--mode={mode}"


Handler = Callable[[ml_collections.ConfigDict, str, Args], int]

# The errors in what the user gave (config, data, paths), each said in one line: (type, message), first match wins.
USER_ERRORS: tuple[tuple[type[Exception], Callable[[Exception, str], str]], ...] = (
    (ConfigError, lambda e, command: f"invalid config: {e}"),
    (NonFiniteLossError, lambda e, command: f"{command}: {e}; lower optim.lr or raise optim.warmup_steps (the last "
                                            f"checkpoint resumes)"),
    (FormatError, lambda e, command: f"{command}: {e}"),  # bad data: file, line and reason
    (OSError, lambda e, command: f"{command}: {e}"),  # missing files or directories, an unwritable or locked workdir
)
# Modes whose stages say data they cannot use (no judged query, a passage not in the collection) as ValueErrors.
DATA_VALUE_ERRORS = ("evaluate", "mine", "score", "rounds")


def fail(message: str) -> NoReturn:
  """Exits with status 2 and a one-line error (no traceback, no flag dump)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def user_error_message(error: Exception, mode: str, args: Args) -> str | None:
  """The one-line message of an error in what the user gave; None for any other error (a bug: its traceback)."""
  for error_type, message in USER_ERRORS:
    if isinstance(error, error_type):
      return message(error, args.command(mode))
  if isinstance(error, ValueError) and mode in DATA_VALUE_ERRORS:
    return f"{args.command(mode)}: {error}"
  return None


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """Checks the sections `mode` reads before anything is compiled or written; raises ConfigError."""
  if mode in ("train", "rounds", "benchmark"):  # rounds without training lines of its own mines them first
    need_data = mode == "train" or (mode == "rounds" and bool(config.data.train))
    config_lib.validate(config, jax.device_count(), need_data=need_data)
  if mode == "evaluate":
    from pairdistill_jax.retrieval import eval_data  # noqa: PLC0415 (faiss only when used)

    eval_data.check_eval_config(config.eval)
  if mode in ("mine", "score"):
    section = "mine" if mode == "mine" else "teacher"
    for field in ("queries", "collection"):
      if not (config[section][field] or config.data[field] or config.data.demo):
        raise ConfigError(f"{section}.{field} and data.{field} are empty: set --config.data.{field}=PATH")
  if mode == "score":
    from pairdistill_jax.teachers import score  # noqa: PLC0415

    score.check_teacher_config(config.teacher)


def run_train(config: ml_collections.ConfigDict, workdir: str, args: Args) -> int:
  """--mode=train: prints the run summary (also after a preemption: the checkpoint is saved, a rerun resumes)."""
  from pairdistill_jax.train import loop  # noqa: PLC0415 (keeps --help and config errors fast)

  summary = loop.train(config, workdir)
  if jax.process_index() == 0:
    print(format_summary(summary))
    print("SUMMARY " + json.dumps(summary))
  return 0


def run_teacher_stage(config: ml_collections.ConfigDict, workdir: str, args: Args, *, mode: str) -> int:
  """--mode=mine or --mode=score over the training queries and collection (the demo's under :demo)."""
  from pairdistill_jax.teachers import mining, rounds, score  # noqa: PLC0415

  stage = config["mine" if mode == "mine" else "teacher"]
  demo.ensure_demo_data(config, workdir)
  data = paths.data_paths(config, workdir)
  queries, collection = stage.queries or data.queries, stage.collection or data.collection
  if mode == "mine":
    result = mining.mine(config, workdir, queries_path=queries, collection_path=collection)
  else:
    result = score.score(config, workdir, queries_path=queries, collection_path=collection,
                         student=rounds.student_factory(config, workdir))
  if jax.process_index() == 0:
    print(f"{mode}: {result.path}" + (" (up to date, skipped)" if result.skipped else ""))
  return 0


def run_rounds(config: ml_collections.ConfigDict, workdir: str, args: Args) -> int:
  """--mode=rounds: prints each round's training summary."""
  from pairdistill_jax.teachers import rounds  # noqa: PLC0415

  summaries = rounds.run_rounds(config, workdir)
  if jax.process_index() == 0:
    for r, summary in enumerate(summaries, 1):
      print(f"round {r}: " + format_summary(summary))
    print("ROUNDS " + json.dumps(summaries))
  return 0


def _load_trained(workdir: str, hint: str = ""):
  from pairdistill_jax import checkpoint  # noqa: PLC0415

  try:
    return checkpoint.load_trained(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}{hint}") from None


def run_export(config: ml_collections.ConfigDict, workdir: str, args: Args) -> int:
  """--mode=export: the latest checkpoint as PyTorch serving directories (the config is the checkpoint's)."""
  trained = _load_trained(workdir)
  out = args.export_dir or os.path.join(workdir, "export")
  if jax.process_index() == 0:
    with tempfile.TemporaryDirectory(prefix="pairdistill-export-") as scratch, \
        _local_workdir(out, scratch, push=True) as local:
      students.get(trained.config.model.kind).export(pathlib.Path(local), trained.bert_config, trained.params,
                                                     trained.tokenizer_dir, trained.config.model)
      print(f"exported {trained.config.model.kind} (step {trained.step}) to {remote.in_bucket(out)}: "
            f"{', '.join(sorted(os.listdir(local)))}")
  return 0


def run_benchmark(config: ml_collections.ConfigDict, workdir: str, args: Args) -> int:
  """--mode=benchmark: the measurements of config.benchmark (pairdistill_jax.bench.modes)."""
  from pairdistill_jax.bench import modes  # noqa: PLC0415
  from pairdistill_jax.teachers import rounds  # noqa: PLC0415

  modes.run(config, workdir, student=rounds.student_factory(config, workdir))
  return 0


def run_evaluate(config: ml_collections.ConfigDict, workdir: str, args: Args) -> int:
  """--mode=evaluate: the latest checkpoint (or --model_dir, or --init) on config.eval; prints the metrics
  table."""
  from pairdistill_jax.retrieval import evaluate  # noqa: PLC0415

  demo.ensure_demo_data(config, workdir)  # the demo's evaluation files
  out_dir = pathlib.Path(workdir) / paths.EVAL_DIR / args.eval_name
  if not args.eval_name:
    evaluate.keep_earlier_run(out_dir)
  if args.init:
    result = evaluate.evaluate_initial(config, workdir, out_dir=out_dir)
  elif args.model_dir:
    result = evaluate.evaluate_model_dir(remote.staged(args.model_dir), config.eval, workdir, pooling=args.pooling,
                                         title_separator=config.data.title_separator, out_dir=out_dir,
                                         dtype=config.model.dtype, attention=config.model.attention)
  else:
    trained = _load_trained(workdir, "; or evaluate a directory with --model_dir")
    result = evaluate.evaluate_trained(trained, config.eval, workdir, title_separator=config.data.title_separator,
                                       out_dir=out_dir)
  if jax.process_index() == 0:
    print(result.table())
    print("METRICS " + json.dumps(result.metrics))
  return 0


HANDLERS: dict[str, Handler] = {
    "train": run_train,
    "evaluate": run_evaluate,
    "export": run_export,
    "mine": functools.partial(run_teacher_stage, mode="mine"),
    "score": functools.partial(run_teacher_stage, mode="score"),
    "rounds": run_rounds,
    "benchmark": run_benchmark,
}
MODES = tuple(HANDLERS)

_DID_YOU_MEAN = re.compile(r'Did you mean "([^"]+)" instead of "([^"]+)"')
_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/colbert.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0, for multi-process runs "
                                   "outside TPU pods and SLURM (or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Number of processes (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (or JAX_PROCESS_ID).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "--mode=export: output directory (default WORKDIR/export).")
_MODEL_DIR = flags.DEFINE_string("model_dir", None, "--mode=evaluate: evaluate this stanford ColBERT / HF / "
                                 "sentence-transformers directory instead of the workdir's checkpoint.")
_INIT = flags.DEFINE_bool("init", False, "--mode=evaluate: evaluate the student the config starts from "
                          "(init.checkpoint / init.pretrained, init.layers), i.e. before training.")
_EVAL_NAME = flags.DEFINE_string("eval_name", "", "--mode=evaluate: write the run and metrics to WORKDIR/eval/NAME/ "
                                  "(default: WORKDIR/eval/, where an earlier run moves to eval/earlier/).")
_MIRROR_DIR = flags.DEFINE_string("mirror_dir", None, "A bucket --workdir's local mirror (default "
                                  "~/.cache/pairdistill_jax/mirrors/<bucket>/<path>).")
_POOLING = flags.DEFINE_enum("pooling", None, ["cls", "mean"], "--mode=evaluate --model_dir: pooling of an HF "
                             "model (default: its sentence-transformers Pooling config).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown `--config.x` field or a bad value."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    fail(unknown_field_message(str(e.args[0]) if e.args else "", argv))
  except flags.Error as e:
    # ml_collections puts a config file's traceback into the message; its last line is the reason.
    fail(str(e).strip().splitlines()[-1])


def unknown_field_message(error: str, argv: list[str]) -> str:
  """'unknown config field train.stepz (did you mean train.steps?)' from ml_collections' lookup error."""
  fields = [a.split("=", 1)[0].removeprefix("--config.") for a in argv[1:] if a.startswith("--config.")]
  suggestion = _DID_YOU_MEAN.search(error)
  for field in fields:
    parts = field.split(".")
    if suggestion and suggestion.group(2) in parts:
      i = parts.index(suggestion.group(2))
      return (f"unknown config field {'.'.join(parts[:i + 1])} "
              f"(did you mean {'.'.join(parts[:i] + [suggestion.group(1)])}?)")
  named = [f for f in fields if re.search(rf"\b{re.escape(f.split('.')[-1])}\b", error)]
  return f"unknown config field {(named or fields or ['?'])[0]}"


def parse_args() -> Args:
  """The non-config flags; a one-line error for a bad one."""
  args = Args(export_dir=_EXPORT_DIR.value, model_dir=_MODEL_DIR.value, pooling=_POOLING.value, init=_INIT.value,
              eval_name=_EVAL_NAME.value, mirror_dir=_MIRROR_DIR.value)
  if args.eval_name in (".", "..", "earlier", "corpus") or "/" in args.eval_name:
    fail(f"--eval_name={args.eval_name!r}: give a plain name (not a path, 'earlier' or 'corpus')")
  for name, value in (("workdir", _WORKDIR.value), ("export_dir", args.export_dir)):
    if value and remote.is_url(value):
      try:
        remote.check_client(value)
      except ValueError as e:
        fail(f"--{name}: {e}")
  return args


def main(argv: list[str]) -> int:
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  config, mode = _CONFIG.value, _MODE.value
  if config is None:
    fail("--config is required, e.g. --config=configs/colbert.py:demo")
  if not _WORKDIR.value:
    fail("--workdir is required")
  args = parse_args()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    validate(config, mode)
    return run_mode(config, mode, _WORKDIR.value, args)
  except KeyboardInterrupt:  # Ctrl-C outside the training loop, or a second one inside it
    print("\ninterrupted (Ctrl-C): stopped without saving the work in progress; run the same command to resume "
          "from what was saved", file=sys.stderr)
    # Not sys.exit: tearing the interpreter down while XLA's threads still run (a compile, a dispatched step)
    # crashed it with a segmentation fault. The workdir's lock was released as the interrupt unwound.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  except Exception as e:  # noqa: BLE001 (re-raised unless it is the user's: one line, no traceback)
    message = user_error_message(e, mode, args)
    if message is None:
      raise
    fail(message)


def run_mode(config: ml_collections.ConfigDict, mode: str, workdir: str, args: Args) -> int:
  """Runs `mode` holding the workdir's lock (export to another --export_dir only reads the workdir, so it may
  run beside a training)."""
  if mode == "export" and args.export_dir:
    if not remote.is_url(args.export_dir):
      workdir_lib.check_writable(pathlib.Path(args.export_dir).absolute().parent, "--export_dir's parent")
    with tempfile.TemporaryDirectory(prefix="pairdistill-read-") as scratch, \
        _local_workdir(workdir, scratch, push=False, under=paths.MODEL_DIR) as local:
      return run_export(config, local, args)
  with workdir_lib.locked(workdir, mode), \
      _local_workdir(workdir, args.mirror_dir, push=jax.process_index() == 0) as local:
    distributed.barrier("workdir ready")  # the processes of one host may share a mirror: all have pulled it
    return HANDLERS[mode](config, local, args)


@contextlib.contextmanager
def _local_workdir(workdir: str, mirror_dir: str | None, push: bool, under: str = ""):
  """The workdir as a local directory: itself, or a bucket workdir's mirror (pulled first — only its
  subdirectory `under` if given — and pushed as the command runs and when it ends, when `push`)."""
  if not remote.is_url(workdir):
    yield workdir
    return
  mirror = remote.Mirror(workdir, pathlib.Path(mirror_dir or remote.default_mirror_dir(workdir)),
                         bucket_only=(paths.CHECKPOINT_DIR,))
  mirror.pull(under)
  logging.info("Workdir %s: mirrored in %s", workdir, mirror.local)
  with mirror.pushing(push):
    yield str(mirror.local)


def format_summary(summary: dict) -> str:
  """'loss 3.2100 -> 1.0500' lines for each tracked metric."""
  from pairdistill_jax.train.loop import SUMMARY_KEYS  # noqa: PLC0415 (keeps --help and config errors fast)
  from pairdistill_jax.train.preemption import stop_reason  # noqa: PLC0415

  steps, started_at = summary.get("steps", 0), summary.get("started_at", 0)
  lines = [f"trained up to step {steps}" + (" (finished earlier: nothing left to train)" if steps == started_at
                                            else f" (resumed at step {started_at})" if started_at else "")]
  if summary.get("preempted_at") is not None:
    lines.append(f"  {stop_reason(summary.get('stopped_by'))}: checkpoint saved at step {summary['preempted_at']}; "
                 "rerun to resume")
  for key in SUMMARY_KEYS:
    if f"first_{key}" in summary:
      lines.append(f"  {key:15s} {summary[f'first_{key}']:.4f} -> {summary[f'last_{key}']:.4f}")
  return "\n".join(lines)


class _OwnInfoOnly(logging.Filter):
  """INFO records from this package; warnings and errors from everyone (orbax and jax are chatty)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "pairdistill_jax" in record.pathname


def run() -> None:
  jax.config.parse_flags_with_absl()  # JAX's own flags: --jax_platforms=cpu, --jax_default_matmul_precision=...
  logging.getLogger("absl").setLevel(logging.INFO)
  absl_logging.get_absl_handler().addFilter(_OwnInfoOnly())
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  sys.exit(run())
