#!/usr/bin/env bash
# Issue 19 on one GPU (nvidia-h200), about 2 minutes, after benchmarks/fsdp2_lora_check.sh in the same call (it
# installs the shared wheels into /tmp/site-fsdp2 and prepares $W): DeepSpeed ZeRO-3 through `accelerate launch
# --num_processes 1` with recipes/accelerate/zero3.yaml on the tiny model, 4 steps straight beside 2 steps then
# --resume to 4 (checkpoints at 2 and 4), a ZeRO-3 LoRA run, and the full-weight baselines for the ZeRO loss gap on
# one plain process: bf16 weights (`model.dtype=bfloat16`: what DeepSpeed's bf16 mode trains) and fp32 weights
# under autocast (the default); and a ZeRO-3 run with training.compile: true (its summary's `compile` says whether
# the layers compiled or fell back). `benchmarks/distributed.py check` compares the straight and resumed runs.
# Expects .whl-zero/ (deepspeed 0.19.8 built with DS_BUILD_OPS=0, hjson, msgpack, ninja, py-cpuinfo).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
REPO=$PWD
OUT=${OUT:-$REPO/fsdp2-lora-out}/zero3
W=${W:-/tmp/fsdp2-lora}
LIMIT=${LIMIT:-120}
mkdir -p "$OUT" "$W/zero3"
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-zero "$REPO"/.whl-zero/*.whl \
  2>&1 | grep -v "WARNING: Target directory" | tail -3
export PYTHONPATH=/tmp/site-fsdp2:/tmp/site-zero
cd /tmp || exit 1
python3 -c "import deepspeed, align_cli; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$OUT/log.txt"
ZERO3="python3 -m accelerate.commands.launch --config_file $REPO/recipes/accelerate/zero3.yaml --num_processes 1"
# No warm-up: the tiny recipe's warmup_ratio would give the 2-step run a shorter warm-up than the 4-step one (and
# --resume refuses a max_steps change while the schedule depends on the total, run_dir.MAX_STEPS_RULE).
TRAIN="-m align_cli.cli train $W/tiny.yaml --set training.warmup_ratio=0.0"
run() {  # NAME COMMAND...
  local name=$1; shift
  timeout -k 5 "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "$name rc=$rc"
  [ $rc -ne 0 ] && grep -v -i "warn" "$OUT/$name.log" | tail -15 | tee -a "$OUT/log.txt"
  return $rc
}
run zero3-straight $ZERO3 --main_process_port 29621 $TRAIN --output-dir $W/zero3/straight &
(run zero3-half $ZERO3 --main_process_port 29622 $TRAIN --output-dir $W/zero3/resumed --set training.max_steps=2 \
  && run zero3-resume $ZERO3 --main_process_port 29623 $TRAIN --output-dir $W/zero3/resumed --resume) &
run zero3-lora $ZERO3 --main_process_port 29624 $TRAIN --output-dir $W/zero3/lora --set peft.enabled=true \
  --set peft.r=8 --set reference.precompute=true --set reference.cache_dir=$W/zero3/cache &
run single-full-bf16-weights python3 $TRAIN --output-dir $W/zero3/bf16 --set model.dtype=bfloat16 &
# training.compile: true under ZeRO-3 (auto does not compile there): the layers compile or fall back (issue 18)
run zero3-compile $ZERO3 --main_process_port 29625 $TRAIN --output-dir $W/zero3/compile --set training.compile=true &
run single-full-autocast python3 $TRAIN --output-dir $W/zero3/autocast &
wait
python3 "$REPO/benchmarks/distributed.py" check --out $W --name zero3 --straight $W/zero3/straight \
  --resumed $W/zero3/resumed --lora $W/zero3/lora > "$OUT/check.log" 2>&1 || tail -20 "$OUT/check.log" | tee -a "$OUT/log.txt"
cp $W/checks/zero3.json "$OUT/" 2>/dev/null && cat "$OUT/zero3.json" | tee -a "$OUT/log.txt"
python3 - "$W/zero3" <<'PY' 2>&1 | tee -a "$OUT/log.txt"
import json, sys
from pathlib import Path
root = Path(sys.argv[1])
for name in ("straight", "resumed", "lora", "bf16", "autocast", "compile"):
    path = root / name / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []
    print(name, [(r["step"], round(r["loss"], 6)) for r in rows if r["split"] == "train"])
summary = root / "compile" / "summary.json"
print("compile under ZeRO-3:", json.loads(summary.read_text()).get("compile") if summary.exists() else "no summary")
PY
for name in straight resumed lora bf16 autocast compile; do
  mkdir -p "$OUT/$name"; cp $W/zero3/$name/metrics.jsonl $W/zero3/$name/summary.json "$OUT/$name/" 2>/dev/null
done
log "done"
