#!/usr/bin/env bash
# One device call for the fused decode layers (align_cli/fused_decode.py, align_cli/decode_kernels.py). Parts, in
# order, chosen by PARTS (default: all): `tiles` (benchmarks/decode_layer_tiles.py: each kernel's tile shapes
# against cuBLAS / SDPA, 0.5B shape, 32 sequences), `tests` (the GPU tests of the fused layers), `rollouts`
# (benchmarks/rollouts.py at grpo.yaml's 32 sequences: fused kernels against the model's layer code, one profiled
# run), `rl` (the GRPO step through the trainer at 32 rollouts, both paths). Carry .whl-fast/ and .whl-rl/.
#   PARTS="tests rollouts rl" TILES_S=150 TESTS_S=150 ROLLOUTS_S=150 RL_S=190 bash benchmarks/run_fused_decode_gpu.sh
# (rollouts: ROLLOUT_SHAPES, ROLLOUT_SEQUENCES, ROLLOUT_METHODS and ROLLOUT_ONLY go to rollouts.py's --shapes,
# --sequences, --methods and --only)
# The tiles part's fastest tile shapes are used by the parts after it (ALIGN_DECODE_TILES; USE_BEST_TILES=0: not).
# Results land in $OUT (decode-layer-tiles-h200.json, rollouts-fused-layers-h200.json, rl-end-to-end-h200.json, logs).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
REPO=$PWD
OUT=${OUT:-$REPO/benchmark-out}
PARTS=${PARTS:-tiles tests rollouts rl}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --target /tmp/site \
    "$REPO"/.whl-fast/*.whl "$REPO"/.whl-rl/*.whl "$REPO" >/tmp/pip-install.log 2>&1 || tail -20 /tmp/pip-install.log
export PYTHONPATH=/tmp/site
cd /tmp || exit 1
for part in $PARTS; do
    echo "== $part"
    case $part in
    tiles)
        timeout "${TILES_S:-150}" python3 "$REPO/benchmarks/decode_layer_tiles.py" --out "$OUT" --shapes 0.5b \
            --batches 32 --best-tiles "$OUT/best-tiles.json" 2>&1 | tee "$OUT/decode-layer-tiles.log" | tail -12
        # the later parts run with the fastest tiles of this sweep (USE_BEST_TILES=0: with decode_kernels.TILES)
        if [ "${USE_BEST_TILES:-1}" = 1 ] && [ -s "$OUT/best-tiles.json" ]; then
            export ALIGN_DECODE_TILES=$(cat "$OUT/best-tiles.json")
        fi ;;
    tests)
        timeout "${TESTS_S:-150}" python3 -m pytest "$REPO/tests/test_fused_decode.py" -m gpu -q -p no:cacheprovider \
            -p no:logging --tb=line -rf --rootdir "$REPO" -c "$REPO/pyproject.toml" 2>&1 | tail -30 ;;
    rollouts)
        timeout "${ROLLOUTS_S:-150}" python3 "$REPO/benchmarks/rollouts.py" --out "$OUT" --shapes ${ROLLOUT_SHAPES:-0.5b} \
            --sequences ${ROLLOUT_SEQUENCES:-32} --new-tokens 256 --repeats 3 --profile ours_compiled \
            --methods ${ROLLOUT_METHODS:-ours_compiled ours_compiled_model_layers} \
            --only ${ROLLOUT_ONLY:-} --name rollouts-fused-layers-h200.json 2>&1 | tee "$OUT/rollouts-fused-layers.log" \
            | grep -v '^{' | tail -12 ;;
    rl)
        export RL_END_TO_END_COMMAND="PARTS=rl bash benchmarks/run_fused_decode_gpu.sh"
        timeout "${RL_S:-190}" python3 "$REPO/benchmarks/rl_end_to_end.py" --out "$OUT" \
            --tokenizer "$REPO/.whl-rl/tokenizer" --shape 0.5b --prompts-per-step 4 --max-new-tokens 256 --steps 3 \
            --paths ours ours_model_layers 2>&1 | tee "$OUT/rl-end-to-end.log" | tail -5 ;;
    esac
done
