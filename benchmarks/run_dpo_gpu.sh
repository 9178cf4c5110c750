#!/usr/bin/env bash
# One device run of the DPO benchmark: carried wheels, the GPU packing tests, then benchmarks/dpo_vs_trl.py.
# Expects in $WHEELS (default .whl-dpo/): trl 1.16.0, datasets 4.7.0, dill 0.4.0, multiprocess 0.70.18,
# pydantic 2.14.3 (+ pydantic_core, annotated_types, typing_inspection), and arrow/pyarrow 21.0.0, installed
# only where the machine's pyarrow is older (benchmarks/RESULTS.md says how they were fetched).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
REPO=$PWD
WHEELS=${WHEELS:-$REPO/.whl-dpo}
OUT=${OUT:-$REPO/benchmark-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
EXTRA=""
python3 -c "import sys, pyarrow; from packaging.version import Version as V; print('pyarrow', pyarrow.__version__); sys.exit(V(pyarrow.__version__) < V('21'))" \
    || EXTRA=$(ls "$WHEELS"/arrow/*.whl)
# SKIP_INSTALL=1: a second run in the same device call reuses /tmp/site (the ~45 s install once per call)
[ -n "$SKIP_INSTALL" ] && [ -d /tmp/site/align_cli ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --target /tmp/site \
    "$WHEELS"/*.whl $EXTRA "$REPO" 2>&1 | grep -v "WARNING: Target directory" || true
export PYTHONPATH=/tmp/site
cd /tmp || exit 1  # away from the checkout's align_cli/, which lacks the installed kernels and losses
python3 -c "import torch, transformers, trl, datasets, accelerate, triton, align_cli.kernels; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__, 'triton', triton.__version__)" || exit 1
[ -n "$SKIP_TESTS" ] || python3 -m pytest "$REPO/tests/test_packing.py" -m gpu -q -s -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" 2>&1 | tee "$OUT/tests.log"
python3 "$REPO/benchmarks/dpo_vs_trl.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
