#!/usr/bin/env bash
# Profiles fastconv kernels with Nsight Compute on one benchmark shape (GPU machines; ncu must be on PATH).
#
#   scripts/profile.sh [--kernel REGEX] [--skip N] [--count N] [--set NAME] [--out PATH] [-- TARGET ARGS]
#
#   --kernel REGEX  only kernels whose (demangled) name matches, e.g. 'gemm_wmma' or 'batch_norm'
#   --skip N        skip the first N matching launches inside the profiled range (default 0)
#   --count N       profile at most N launches (default 10)
#   --set NAME      ncu section set: basic, detailed or full (default full)
#   --out PATH      report path without extension (default profiles/<op>-<layer>-<algo>-<dtype>)
#   TARGET ARGS     bench/profile_target.py's: --layer, --op, --algo, --dtype, --layout, --iters
#
# Only the launches inside profile_target.py's NVTX range "profile" are profiled (warm-up calls are not).
# The report opens in the Nsight Compute GUI, or as text: ncu --import PATH.ncu-rep --page details
set -euo pipefail
cd "$(dirname "$0")/.."
kernel="" skip=0 count=10 set=full out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --kernel) kernel=$2; shift 2 ;;
    --skip) skip=$2; shift 2 ;;
    --count) count=$2; shift 2 ;;
    --set) set=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
target=("$@")
arg() {  # the value of a target option, or its default
  local name=$1 default=$2 i
  for ((i = 0; i < ${#target[@]} - 1; i++)); do
    [ "${target[$i]}" = "$name" ] && { echo "${target[$((i + 1))]}"; return; }
  done
  echo "$default"
}
if [ -z "$out" ]; then
  out="profiles/$(arg --op fprop)-$(arg --layer resnet50_l1_3x3)-$(arg --algo im2col)-$(arg --dtype bfloat16)"
fi
mkdir -p "$(dirname "$out")"
PY=${FASTCONV_PYTHON:-python3}
filter=()
[ -n "$kernel" ] && filter=(--kernel-name "regex:$kernel")
set -x
ncu --nvtx --nvtx-include "profile/" "${filter[@]}" --launch-skip "$skip" --launch-count "$count" \
  --set "$set" --import-source yes -f -o "$out" "$PY" bench/profile_target.py "${target[@]}"
ncu --import "$out.ncu-rep" --page details --print-summary per-kernel > "$out.txt" || true
# every metric collected, one row per kernel (the warp stall reasons the details page draws only as a chart)
ncu --import "$out.ncu-rep" --page raw --csv > "$out.raw.csv" || true
{ set +x; } 2>/dev/null
echo "profile: $out.ncu-rep (text summary: $out.txt, all metrics: $out.raw.csv)"
