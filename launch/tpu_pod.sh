#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), install this checkout on every worker, run on
# --worker=all. The workdir, data and models live in a GCS bucket, named by gs:// URLs (README: Runs in a bucket):
#
#   TPU_NAME=pd-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#     launch/tpu_pod.sh --config=configs/colbert.py --workdir=gs://my-bucket/runs/colbert \
#       --config.init.pretrained=gs://my-bucket/models/colbertv2.0 \
#       --config.data.train=gs://my-bucket/data/pairs.train.jsonl \
#       --config.data.collection=gs://my-bucket/data/collection.tsv \
#       --config.data.queries=gs://my-bucket/data/queries.train.tsv
#
# Or BUCKET=my-bucket mounts the bucket at /gcs on every worker with gcsfuse, and local paths (/gcs/runs/colbert)
# name it. jax.distributed initialises itself on a pod; on preemption every worker saves at the same step and exits.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
BUCKET=${BUCKET:-}
ACCELERATOR=${ACCELERATOR:-v4-8}
RUNTIME=${RUNTIME:-tpu-ubuntu2204-base}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
cd "$(dirname "$0")/.."

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE" $PROJECT_FLAG; }

if ! tpu describe "$TPU_NAME" >/dev/null 2>&1; then
  tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR" --version="$RUNTIME"
fi

archive=$(mktemp -d)/pairdistill_jax.tar.gz
git ls-files -z | tar --null -czf "$archive" -T -
tpu scp "$archive" "$TPU_NAME":pairdistill_jax.tar.gz --worker=all
tpu ssh "$TPU_NAME" --worker=all --command "
  set -e
  mkdir -p ~/pairdistill_jax && tar -xzf ~/pairdistill_jax.tar.gz -C ~/pairdistill_jax
  cd ~/pairdistill_jax
  python3 -m venv .venv
  .venv/bin/pip install -q -r requirements-tpu.txt && .venv/bin/pip install -q --no-deps -e .
  if [ -n '$BUCKET' ] && ! mountpoint -q /gcs; then
    command -v gcsfuse >/dev/null || { echo 'gcsfuse is missing on this worker: install it (Cloud Storage FUSE) or use a runtime image that has it' >&2; exit 1; }
    sudo mkdir -p /gcs && sudo chown \$USER /gcs && gcsfuse --implicit-dirs $BUCKET /gcs
  fi"
printf -v args '%q ' "$@"
tpu ssh "$TPU_NAME" --worker=all --command "cd ~/pairdistill_jax && .venv/bin/python -m pairdistill_jax.main $args"
