#!/usr/bin/env bash
# The device check of one NVIDIA GPU, in under 8 minutes: the `gpu` tests (tests/test_gpu.py), the ColBERT
# recipe's train step (the recipe itself, then without attention dropout on the einsums, on cuDNN attention and
# on cuDNN with two remat policies), corpus encoding (passages/s) and T5-base-shaped monoT5/duoT5 teachers
# (passages/s, pairs/s), all merged into ONE JSON file. Each part runs under `timeout`, cut to what is left of
# the budget (BUDGET_S, default 450 s); a part that fails or hangs is recorded and the next one runs.
#
#   benchmarks/device_check.sh [OUT.json]              # on the GPU machine; default device_check.json
#   benchmarks/device_check.sh --cpu-smoke [OUT.json]  # the same parts with tiny shapes on a CPU
#
# Runs from a fresh clone with the machine's own jax (PYTHON, default python3); packages that are missing are
# installed from requirements-base.txt (jax is already there, so pip leaves it as it is).
set -uo pipefail

SMOKE=0
if [[ "${1:-}" == --cpu-smoke ]]; then SMOKE=1; shift; fi
OUT=$(realpath -m "${1:-device_check.json}")
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d -t device_check.XXXXXX)
PARTS=$WORK/parts.jsonl
DEADLINE=$((SECONDS + ${BUDGET_S:-450}))
echo "device_check: logs and workdirs in $WORK"

# part NAME LIMIT_S COMMAND...: COMMAND under `timeout` (LIMIT_S or what is left of the budget), its output in
# WORK/NAME.log; its exit status and seconds appended to WORK/parts.jsonl (124: timed out).
part() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  (( DEADLINE - SECONDS < limit )) && limit=$((DEADLINE - SECONDS))
  if (( limit < 30 )); then
    echo "{\"part\": \"$name\", \"skipped\": \"budget spent\"}" >> "$PARTS"
    echo "device_check: $name skipped (budget spent)"
    return
  fi
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}" >> "$PARTS"
  echo "device_check: $name rc=$rc in $((SECONDS - start)) s (limit $limit s)"
}

if (( SMOKE )); then
  export JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=8
  STUDENT=(--config=configs/colbert.py:demo,batch_size=8,nway=4 --config.model.query_maxlen=8
           --config.model.doc_maxlen=12 --config.model.bert.vocab_size=64 --config.model.bert.hidden_size=32
           --config.model.bert.num_hidden_layers=1 --config.model.bert.intermediate_size=64
           --config.data.max_pairs=3 --config.benchmark.steps=2 --config.benchmark.warmup=0)
  FUSED=dot_product_attention  # cuDNN needs the GPU
  ENCODE_BATCH=32 TEACHER_ITEMS=16
  T5_SHAPE='{"vocab_size": 6200, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}'
else
  export JAX_PLATFORMS=cuda,cpu  # tests/conftest.py otherwise keeps JAX on the CPU
  STUDENT=(--config=configs/colbert.py:batch_size=8 --config.benchmark.steps=5 --config.benchmark.warmup=1)
  FUSED=cudnn
  ENCODE_BATCH=1024 TEACHER_ITEMS=2048
  T5_SHAPE='{"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12}'  # T5 v1.0 base
  EXTRA=pytest
  "$PY" -c "import faiss" 2>/dev/null || EXTRA+=" faiss-gpu>=1.14.3"
  part install 180 "$PY" -m pip install -q --retries 1 --timeout 15 -r requirements-base.txt $EXTRA
fi

NODROP=model.bert.attention_probs_dropout_prob=0.0  # the fused kernels have no attention dropout
VARIANTS="$NODROP,model.attention=einsum;$NODROP,model.attention=$FUSED"
VARIANTS+=";$NODROP,model.attention=$FUSED,model.remat=dots_with_no_batch_dims_saveable"
VARIANTS+=";$NODROP,model.attention=$FUSED,model.remat=full"
BENCH=("$PY" -m pairdistill_jax.main --mode=benchmark "${STUDENT[@]}")

XLA_PYTHON_CLIENT_PREALLOCATE=false part gpu_tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu \
  --junitxml="$WORK/gpu_tests.xml" tests/test_gpu.py
part train 240 "${BENCH[@]}" --workdir="$WORK/train" --config.benchmark.variants="$VARIANTS"
part encode 90 "${BENCH[@]}" --workdir="$WORK/encode" --config.benchmark.what=encode \
  --config.benchmark.encode_batch=$ENCODE_BATCH
part teacher_weights 60 "$PY" - "$WORK/t5" "$T5_SHAPE" <<'EOF'
"""A random T5 of the given shape as an HF directory, with a word-level tokenizer of the benchmark's words."""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from pairdistill_jax.bench import teacher
from pairdistill_jax.convert import hf_io, t5_table
from pairdistill_jax.models.t5 import T5Config, T5Scorer

directory, config = pathlib.Path(sys.argv[1]), T5Config(**json.loads(sys.argv[2]))
directory.mkdir(parents=True)
ids = jnp.ones((1, 8), jnp.int32)
params = jax.jit(lambda: T5Scorer(config).init(jax.random.key(0), ids, ids))()["params"]
hf_io.write_safetensors(directory / hf_io.SAFETENSORS, t5_table.flax_to_hf(params, config))
(directory / hf_io.CONFIG).write_text(json.dumps(config.to_hf_dict()))
pieces = ["<pad>", "</s>", "<unk>", *("▁" + w for w in ["Query:", "Document:", "Document0:", "Document1:",
                                                       "Relevant:", *sorted(set(teacher._WORDS))])]
tok = tokenizers.Tokenizer(models.Unigram([(p, -1.0) for p in pieces], unk_id=2))
tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                             extra_ids=0).save_pretrained(directory)
EOF
part teacher 150 "${BENCH[@]}" --workdir="$WORK/teacher" --config.benchmark.what=teacher \
  --config.benchmark.teacher_items=$TEACHER_ITEMS \
  --config.teacher.pointwise.scorer=monot5 --config.teacher.pointwise.model="$WORK/t5" \
  --config.teacher.pointwise.batch_per_device=128 --config.teacher.pairwise.scorer=duot5 \
  --config.teacher.pairwise.model="$WORK/t5" --config.teacher.pairwise.batch_per_device=128
part encode_einsum 60 "${BENCH[@]}" --workdir="$WORK/encode_einsum" --config.benchmark.what=encode \
  --config.benchmark.encode_batch=$ENCODE_BATCH --config.model.attention=einsum

"$PY" - "$WORK" "$OUT" "$SMOKE" <<'EOF'
"""Merges the parts' exit statuses, the gpu tests' outcomes and every BENCHMARK record into one JSON file."""
import json
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

work, out, smoke = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3] == "1"


def records(name):
  path = work / name / "benchmark.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def tests():
  path = work / "gpu_tests.xml"
  if not path.is_file():
    return None
  cases = []
  for case in ET.parse(path).iter("testcase"):
    result = next(iter(case), None)
    outcome = "passed" if result is None or result.tag == "system-out" else result.tag
    cases.append({"test": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                  "message": None if result is None else (result.get("message") or "")[:2000]})
  counts = {o: sum(c["outcome"] == o for c in cases) for o in {c["outcome"] for c in cases}}
  return {"counts": counts, "cases": cases}


def environment():
  try:
    import faiss
    import jax
    env = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
           "device_kind": jax.devices()[0].device_kind, "faiss": faiss.__version__,
           "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0}
  except Exception as e:  # noqa: BLE001 - the report is written whatever failed
    env = {"error": repr(e)}
  smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False) if not smoke else None
  return {**env, "nvidia_smi": smi.stdout.strip() if smi else None, "python": sys.version.split()[0]}


parts = [json.loads(line) for line in (work / "parts.jsonl").read_text().splitlines()]
report = {"cpu_smoke": smoke, "environment": environment(), "parts": parts, "gpu_tests": tests(),
          "train": records("train"), "encode": records("encode") + records("encode_einsum"),
          "teacher": records("teacher"), "logs": str(work)}
out.write_text(json.dumps(report, indent=1))
failed = [p["part"] for p in parts if p.get("rc")]
print(f"device_check: wrote {out}; parts failed: {failed or 'none'}")
EOF
