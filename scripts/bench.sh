#!/usr/bin/env bash
# The benchmark comparison of fastconv against native PyTorch: sets up .venv and the build on first use,
# then runs `pytest bench/` (extra arguments go to pytest) and prints the comparison table.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PY" -m pytest bench "$@"
