#!/usr/bin/env bash
# One device run: GPU tests of the kernels, the benchmark, then the part-by-part timing. Results and
# logs go to $OUT.
# Expects the liger-kernel and trl wheels in .whl/ (benchmarks/RESULTS.md says how they were fetched);
# only those two are installed.
set -o pipefail
export PYTHONUNBUFFERED=1
REPO=$PWD
OUT=${OUT:-$REPO/benchmark-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/trl-*.whl .whl/liger_kernel-*.whl || exit 1
# align_cli.kernels without importing the rest of the application (logprob_kernels/ installs as align_cli.kernels).
mkdir -p /tmp/align/align_cli && cp align_cli/__init__.py /tmp/align/align_cli/ && cp -r kernels /tmp/align/align_cli/kernels
export PYTHONPATH=/tmp/align:/tmp/site
cd /tmp || exit 1  # away from the checkout's align_cli/, which has no kernels/ inside (they install there from logprob_kernels/)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, trl, liger_kernel, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 270 python3 -m pytest "$REPO/tests/test_kernels.py" -q -p no:cacheprovider --rootdir "$REPO" -c "$REPO/pyproject.toml" \
    --durations=8 2>&1 | tee "$OUT/tests.log"
python3 "$REPO/benchmarks/fused_logprobs.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
python3 "$REPO/benchmarks/kernel_parts.py" --out "$OUT" 2>&1 | tee "$OUT/parts.log"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
