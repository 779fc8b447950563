#!/usr/bin/env bash
# The test suite: sets up .venv and the build on first use, then runs pytest on tests/ (extra arguments
# go to pytest). CUDA tests run when a GPU is visible and are skipped otherwise.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PY" -m pytest tests "$@"
