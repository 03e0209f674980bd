#!/usr/bin/env bash
# Idempotent set-up of a fresh machine for opo: torch (CPU build unless one is installed),
# then this package in editable mode with the test extras and the integrations' test
# dependencies, then the native CPU op.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  # A CPU build of torch; set OPO_TORCH_SPEC to pick another (e.g. a CUDA build on a GPU box).
  "$PY" -m pip install -q "${OPO_TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".[test]"
# The TRL and verl integrations' test dependencies (verl itself without its GPU stack).
"$PY" -m pip install -q -r requirements/integrations.txt
"$PY" -m pip install -q --no-deps -r requirements/integrations-nodeps.txt
# Build (and cache) the native vocabulary-pass op now rather than inside the first test.
"$PY" -m opo_kernels.native || echo "setup: native CPU op not built; the torch path will be used"
