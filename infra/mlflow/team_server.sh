#!/usr/bin/env bash
# The team's MLflow tracking server: runs and the model registry in PostgreSQL, artifacts behind the
# server's proxy (clients need only the server's URL, never the bucket's credentials).
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db-host:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://team-bucket/mlflow \
#   infra/mlflow/team_server.sh
#
# Optional: MLFLOW_HOST (default 0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (4), MLFLOW (the mlflow
# executable; default the one on PATH, else the repo's .venv). The database must exist and the role own
# it (see infra/mlflow/README.md); the server creates and migrates its tables at start. For an s3://
# destination install boto3 and set the usual AWS_* variables (AWS_ENDPOINT_URL for MinIO/Ceph).
# Reached by a name (a Kubernetes Service, a DNS name)? List it in MLFLOW_SERVER_ALLOWED_HOSTS: MLflow
# rejects Host headers other than localhost and private IPs. Clients set mlflow.tracking_uri:
# http://<host>:<port> in the training config. SIGTERM stops the server and its workers.
set -euo pipefail
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:PORT/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION (s3://bucket/prefix, or a shared folder)}"
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://*|postgresql+psycopg://*) ;;  # psycopg 3, SQLAlchemy 2.1's default driver
  *) echo "team_server.sh: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI" \
          "(infra/mlflow/start_server.sh is the single-user sqlite server)" >&2; exit 2 ;;
esac
MLFLOW="${MLFLOW:-$(command -v mlflow || echo "$(dirname "$0")/../../.venv/bin/mlflow")}"
# The job runner (MLflow's background jobs for GenAI features) is not used here and costs ~2.5 GB.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec "$MLFLOW" server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}"
