#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/bench.sh. On first use it creates .venv with the pinned
# requirements (requirements-dev.txt: torch 2.14.1 and the test tools); then it builds the extension in
# place whenever its sources or build switches changed. Afterwards $PY is the Python to run.
#
#   FASTCONV_PYTHON=python3   use that interpreter as it is (no venv, nothing installed): the GPU machines
#                             have torch preinstalled and no network.
#   FASTCONV_CUDA_ARCH, FASTCONV_NO_SM90A, FASTCONV_FORCE_CPU, FASTCONV_LINEINFO, FASTCONV_DEBUG, MAX_JOBS, CUDA_HOME: see setup.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [ -n "${FASTCONV_PYTHON:-}" ]; then
  PY=$FASTCONV_PYTHON
else
  VENV=$ROOT/.venv
  PY=$VENV/bin/python
  if [ ! -x "$PY" ] || ! cmp -s requirements-dev.txt "$VENV/.fastconv-requirements"; then
    echo "fastconv: setting up $VENV (pinned torch and test tools; first run only)" >&2
    python3 -m venv "$VENV"
    # (this machine's pip configuration warns once per missing local index folder: noise, filtered out)
    "$PY" -m pip install --quiet -r requirements-dev.txt 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2
    cp requirements-dev.txt "$VENV/.fastconv-requirements"
  fi
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

# Rebuild only when something that goes into the build changed.
stamp=$( {
  cat setup.py
  find csrc -type f | sort | xargs cat
  echo "${FASTCONV_CUDA_ARCH:-} ${TORCH_CUDA_ARCH_LIST:-} ${FASTCONV_NO_SM90A:-} ${FASTCONV_FORCE_CPU:-} ${CUDA_HOME:-} ${FASTCONV_LINEINFO:-} ${FASTCONV_DEBUG:-}"
  "$PY" -c 'import sys, torch; print(sys.version, torch.__version__, torch.__file__)'
} | sha256sum | cut -d' ' -f1)
if ! ls fastconv/_C*.so >/dev/null 2>&1 || [ "$(cat fastconv/.build-stamp 2>/dev/null)" != "$stamp" ]; then
  echo "fastconv: building the extension (a few minutes the first time on 2 cores)" >&2
  start=$(date +%s)
  "$PY" setup.py --quiet build_ext --inplace >&2
  echo "$stamp" > fastconv/.build-stamp
  echo "fastconv: build took $(( $(date +%s) - start )) s" >&2
fi
export PY
