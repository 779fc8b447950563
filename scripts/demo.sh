#!/usr/bin/env bash
# Trains a CIFAR-style ResNet built from fastconv's kernels on scikit-learn's handwritten digits (no
# download) and prints the test accuracy per epoch: `python -m fastconv.demo` after the usual first-run
# setup (.venv and the build). Extra arguments go to the demo (--epochs, --depth, --device, --algo).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec "$PY" -m fastconv.demo "$@"
