#!/usr/bin/env bash
# One device run of a benchmark script against the installed project: `bash benchmarks/run_installed.sh
# SCRIPT.py ARGS...`. pydantic travels as wheels in .whl-fast/ (the project's config needs it; the device image
# has none); the project is installed with --target (align_cli.losses and align_cli.kernels exist only in the
# installed package) and the script runs from /tmp, away from the checkout's align_cli/. Its output goes to
# $OUT/<script name>.log as well.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
REPO=$PWD
OUT=${OUT:-$REPO/benchmark-out}
SCRIPT=$1
shift
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --target /tmp/site \
    "$REPO"/.whl-fast/*.whl "$REPO" 2>&1 | grep -v "WARNING: Target directory" || true
export PYTHONPATH=/tmp/site
cd /tmp || exit 1
python3 "$REPO/$SCRIPT" --out "$OUT" "$@" 2>&1 | tee "$OUT/$(basename "$SCRIPT" .py).log"
