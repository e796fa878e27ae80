#!/usr/bin/env bash
# Start an MLflow tracking server with a sqlite backend and a local artifact store, in the foreground.
#   infra/mlflow/start_server.sh [STORE_DIR] [PORT]      (defaults: ./outputs/mlflow, 5000)
# Then point training at it: mlflow.tracking_uri: http://127.0.0.1:5000
# SIGTERM to this process stops the server and its workers.
set -euo pipefail
STORE="${1:-outputs/mlflow}"
PORT="${2:-5000}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
mkdir -p "$STORE/artifacts"
STORE="$(cd "$STORE" && pwd)"
# One worker and no job runner: about 0.5 GB and a few seconds to start (docs/STACK.md); the team server is team_server.sh.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
MLFLOW="${MLFLOW:-$(dirname "$0")/../../.venv/bin/mlflow}"
exec "$MLFLOW" server --backend-store-uri "sqlite:///$STORE/mlflow.db" \
  --artifacts-destination "$STORE/artifacts" --serve-artifacts \
  --host "$HOST" --port "$PORT" --workers 1
