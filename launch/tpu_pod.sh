#!/usr/bin/env bash
# distckpt reference training job on a Cloud TPU VM pod slice: one process on every TPU VM host.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a CKPT_DIR=gs://my-bucket/distckpt/run1 \
#     bash launch/tpu_pod.sh --steps 500 --save-every 50
#
# Arguments go to `distckpt train` (default: --steps 20 --save-every 5). Optional: PROJECT (gcloud
# project), PIP_SPEC (what pip installs on the workers; default 'distckpt[tpu]' -- point it at a
# wheel or source checkout the workers can read if distckpt is not on your package index).
#
# `gcloud ... ssh --worker=all` runs the same command on every worker. No JAX_* variables are
# set: JAX's Cloud TPU detection (which distckpt.initialize() uses) reads this worker's number
# and the list of workers from the TPU VM metadata server; worker 0 is the coordinator.
#
# Checkpoints go to Cloud Storage (every worker must read and write the same directory; the
# TPU VM's service account needs access to the bucket). gcsfs is installed for gs:// paths.
# Resume: run the script again with the same CKPT_DIR.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM (pod slice) name}"
: "${ZONE:?set ZONE to the TPU zone, e.g. us-west4-a}"
: "${CKPT_DIR:?set CKPT_DIR to a gs:// directory shared by all workers}"
PIP_SPEC=${PIP_SPEC:-distckpt[tpu]}

if [[ "$CKPT_DIR" != gs://* ]]; then
  echo "tpu_pod.sh: warning: CKPT_DIR=$CKPT_DIR is not gs://; every worker must see the same directory" >&2
fi
if [[ $# -eq 0 ]]; then
  set -- --steps 20 --save-every 5
fi

project_args=()
if [[ -n "${PROJECT:-}" ]]; then
  project_args=(--project "$PROJECT")
fi

# The command every worker runs (quoted here, expanded there).
remote="set -euo pipefail; \
python3 -m pip install --quiet --upgrade $(printf '%q' "$PIP_SPEC") gcsfs; \
export PATH=\"\$HOME/.local/bin:\$PATH\"; \
distckpt train --dir $(printf '%q' "$CKPT_DIR")$(printf ' %q' "$@")"

exec gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${project_args[@]}" \
  --worker=all --command "$remote"
