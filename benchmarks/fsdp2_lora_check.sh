#!/usr/bin/env bash
# Issue 19 on one GPU (nvidia-h200), about 2 minutes: LoRA with `precision: bf16` under FSDP2
# (`accelerate launch --num_processes 1` with recipes/accelerate/fsdp2.yaml, the adapter-disabled policy as
# reference, log-probs precomputed: the launch that failed in benchmarks/RESULTS.md) beside the same recipe on one
# plain process (bf16 base weights: what FSDP2's bf16 parameters over fp32 masters compute; and fp32 weights under
# autocast), and a full-weight FSDP2 run that writes a checkpoint at step 2. Tiny 2-layer Qwen2, 4 steps each.
# Expects $WHEELS (default .whl-fsdp2/): transformers 5.24.0, datasets 5.2.0, dill 0.4.1, multiprocess 0.70.19,
# pydantic 2.14.4, pydantic-core 2.50.5, annotated-types 0.8.0, typing-inspection 0.4.5, typing_extensions 4.16.0,
# regex 2026.11.19 (cp312 manylinux wheels), and $WHEELS/tokenizer/ (SmolLM2's tokenizer files); the machine's
# torch, accelerate and peft. SKIP_INSTALL=1 uses the current environment (a CPU dry run: no FSDP there).
# Results in $OUT: log.txt (exit codes, losses side by side), RUN.log, RUN/metrics.jsonl, RUN/summary.json.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
# NVLink multicast stays off (KINDS.md).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
REPO=$PWD
OUT=${OUT:-$REPO/fsdp2-lora-out}
W=${W:-/tmp/fsdp2-lora}
WHEELS=${WHEELS:-$REPO/.whl-fsdp2}
LIMIT=${LIMIT:-100}   # seconds per run; the runs go side by side
mkdir -p "$OUT" "$W/runs"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
if [ -z "$SKIP_INSTALL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --target /tmp/site-fsdp2 \
    "$WHEELS"/*.whl "$REPO" 2>&1 | grep -v "WARNING: Target directory" | tail -3 | tee -a "$OUT/log.txt"
  export PYTHONPATH=/tmp/site-fsdp2
fi
PYTHON=${PYTHON:-python3}
cd /tmp || exit 1   # the installed package runs, not the checkout's align_cli/
$PYTHON -c "import torch, transformers, accelerate, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)" 2>&1 | tail -1 | tee -a "$OUT/log.txt"
$PYTHON "$REPO/benchmarks/distributed.py" prepare --out "$W" --tokenizer "$WHEELS/tokenizer" --steps 4 --global-batch 8 --tiny \
  > "$W/prepare.log" 2>&1 || { log "prepare failed"; tail -20 "$W/prepare.log" | tee -a "$OUT/log.txt"; exit 1; }
log "prepared"

run() {  # NAME COMMAND...: one bounded run; its metrics, summary and checkpoint file names come back
  local name=$1; shift
  timeout -k 5 "$LIMIT" "$@" --output-dir "$W/runs/$name" > "$OUT/$name.log" 2>&1
  local rc=$?
  mkdir -p "$OUT/$name"
  cp "$W/runs/$name/metrics.jsonl" "$W/runs/$name/summary.json" "$OUT/$name/" 2>/dev/null
  ls "$W/runs/$name/checkpoints/"*/ > "$OUT/$name/checkpoint_files.txt" 2>/dev/null
  log "$name rc=$rc"
  [ $rc -ne 0 ] && grep -v -i "warn" "$OUT/$name.log" | tail -15 | tee -a "$OUT/log.txt"
}
TRAIN="-m align_cli.cli train $W/tiny.yaml"
FSDP2="$PYTHON -m accelerate.commands.launch --config_file $REPO/recipes/accelerate/fsdp2.yaml --num_processes 1"
LORA="--set peft.enabled=true --set peft.r=8 --set reference.precompute=true"
run fsdp2-lora $FSDP2 --main_process_port 29611 $TRAIN $LORA --set reference.cache_dir=$W/cache-fsdp2 &
run single-lora-bf16-weights $PYTHON $TRAIN $LORA --set reference.cache_dir=$W/cache-bf16 --set model.dtype=bfloat16 &
run single-lora-autocast $PYTHON $TRAIN $LORA --set reference.cache_dir=$W/cache-autocast &
run fsdp2-full $FSDP2 --main_process_port 29612 $TRAIN &
wait

$PYTHON - "$OUT" <<'EOF' 2>&1 | tee -a "$OUT/log.txt"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def train(name):
    path = out / name / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    return [(r["loss"], r.get("grad_norm")) for r in rows if r["split"] == "train"]
runs = {n: train(n) for n in ("fsdp2-lora", "single-lora-bf16-weights", "single-lora-autocast", "fsdp2-full")}
for name, rows in runs.items():
    files = (out / name / "checkpoint_files.txt")
    sharded = files.exists() and "pytorch_model_fsdp_0" in files.read_text()
    print(f"{name}: losses {[round(l, 6) for l, _ in rows]} grad norms {[round(g, 5) for _, g in rows if g is not None]}"
          f" sharded checkpoint: {sharded}")
fsdp2 = runs["fsdp2-lora"]
for name in ("single-lora-bf16-weights", "single-lora-autocast"):
    if fsdp2 and len(runs[name]) == len(fsdp2):
        print(f"max |loss diff| fsdp2-lora vs {name}: {max(abs(a[0] - b[0]) for a, b in zip(fsdp2, runs[name])):.2e}")
EOF
log "done"
