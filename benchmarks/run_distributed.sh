#!/usr/bin/env bash
# One device run on 2 GPUs (nvidia-h200-x2): the same recipe and global batch under 1 GPU, DDP, FSDP2,
# ZeRO-2, ZeRO-3 and two "nodes" on one host (each profiles its step 4 per process: compute against
# communication), the online GRPO recipe on 1 GPU and under DDP; then resume and LoRA checks of each engine on a
# tiny model (run side by side, they measure nothing). SHAPE=1.5b for the 1.5B model (a call of its own).
# Results go to $OUT: log.txt, results.json, the plot,
# bundle.tar.gz (metrics, summaries, logs).
# Expects .whl-dist/ (deepspeed, hjson, datasets + needs, pydantic, transformers, the align wheel) and
# .dist-assets/tokenizer/ (SmolLM2's tokenizer files); benchmarks/RESULTS.md says how they were made.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
# NVLink multicast stays off (KINDS.md): a program using it can take the host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
REPO=$PWD
OUT=${OUT:-$REPO/distributed-out}
W=${W:-/tmp/dist}
STEPS=${STEPS:-20}
ENGINES=${ENGINES:-ddp fsdp2 zero2 zero3}
SHAPE=${SHAPE:-0.4b}               # the benchmark model: 0.4b or 1.5b (one call each: both do not fit 10 minutes)
GRPO=${GRPO:-1}                    # 1: also the online GRPO recipe on 1 GPU and under DDP (last, if time is left)
GRPO_ONLY=${GRPO_ONLY:-}           # 1 (with ENGINES=""): only the online runs
GLOBAL_BATCH=${GLOBAL_BATCH:-32}   # pairs per optimiser step; 2-process runs take half each
HALF=$((GLOBAL_BATCH / 2))
EXTRA=${EXTRA:-}                   # more --set overrides for every run (CPU smoke tests)
mkdir -p "$OUT" $W/logs $W/runs $W/checks
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }
bundle() {  # what exists so far, so a command stopped at its limit still returns it
  (cd $W && tar czf "$OUT/bundle.tar.gz" logs runs/*/metrics.jsonl runs/*/summary.json runs/*/profile checks/*.json \
    checks/*/metrics.jsonl checks/*/summary.json 2>/dev/null)
}
if [ -z "$SKIP_INSTALL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl-dist/*.whl \
    2>&1 | tail -3 | tee -a "$OUT/log.txt"
  export PYTHONPATH=/tmp/site
fi
cd /tmp || exit 1   # the installed wheel runs, not the checkout's align_cli/
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv | tee -a "$OUT/log.txt"
nvidia-smi topo -m 2>&1 | tee -a "$OUT/log.txt"   # the interconnect: NV# (NVLink), PIX/PXB/SYS (PCIe)
python3 -c "import torch, transformers, accelerate, deepspeed, datasets, align_cli; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__, 'datasets', datasets.__version__)" 2>&1 | tail -1 | tee -a "$OUT/log.txt"
python3 "$REPO/benchmarks/distributed.py" prepare --out $W --tokenizer "$REPO/.dist-assets/tokenizer" --steps "$STEPS" --global-batch $GLOBAL_BATCH --shape "$SHAPE" $PREPARE_ARGS \
  >> $W/logs/prepare.log 2>&1 || { log "prepare failed"; tail -20 $W/logs/prepare.log >> "$OUT/log.txt"; }
log "prepared"

ALIGN="python3 -m align_cli.cli"
LAUNCH="python3 -m accelerate.commands.launch"
CONFIGS=${CONFIGS:-$REPO/recipes/accelerate}
bench() {  # NAME LIMIT COMMAND...: one timed run with a GPU memory trace
  local name=$1 limit=$2; shift 2
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 250 > $W/logs/$name.mem &
  local sampler=$! start=$(date +%s%N)
  timeout -k 10 "$limit" "$@" > $W/logs/$name.log 2>&1
  local rc=$?
  kill $sampler 2>/dev/null
  local peak=$(awk -F', ' '{if ($2 > m[$1]) m[$1] = $2} END {for (g in m) printf "gpu%s=%sMiB ", g, m[g]}' $W/logs/$name.mem)
  log "$name rc=$rc wall=$(( ($(date +%s%N) - start) / 1000000 ))ms peak_memory: $peak saved: $(du -sh $W/runs/$name 2>/dev/null | cut -f1)"
  [ $rc -ne 0 ] && grep -v "Warning\|warn" $W/logs/$name.log | tail -25 >> "$OUT/log.txt"
  bundle
}
B="$W/bench.yaml"
[ -z "$GRPO_ONLY" ] && bench 1gpu 120 env CUDA_VISIBLE_DEVICES=0 $ALIGN train $B --output-dir $W/runs/1gpu --set training.batch_size=$GLOBAL_BATCH $EXTRA
for engine in $ENGINES; do
  bench $engine 120 $ALIGN train $B --output-dir $W/runs/$engine --set training.batch_size=$HALF $EXTRA \
    --accelerate-config $CONFIGS/$engine.yaml --num-processes 2
done
node() {  # one "node" of the two-node run: its own launcher and GPU
  CUDA_VISIBLE_DEVICES=$1 $LAUNCH --config_file $CONFIGS/multi_node.yaml --num_machines 2 --machine_rank $1 \
    --main_process_ip 127.0.0.1 --main_process_port 29555 --num_processes 2 \
    -m align_cli.cli train $B --output-dir $W/runs/2node --set training.batch_size=$HALF $EXTRA > $W/logs/2node-rank$1.log 2>&1
}
two_nodes() { node 1 & local other=$!; node 0; local rc=$?; wait $other; return $(( rc | $? )); }
export -f node two_nodes
export LAUNCH CONFIGS B W HALF EXTRA
[ -z "$GRPO_ONLY" ] && bench 2node 120 bash -c two_nodes

# What is left of the command's 10 minutes, less a minute for the report, bounds each check launch.
LIMIT=$(( (${BUDGET:-540} - SECONDS) / 2 )); [ $LIMIT -gt 120 ] && LIMIT=120
log "checks: resume and LoRA per engine (tiny model, side by side), ${LIMIT}s per launch"
T="$W/tiny.yaml"
port=29600
tiny() {  # ENGINE PORT LOG ARGS...
  local engine=$1 port=$2 out=$3; shift 3
  timeout -k 5 $LIMIT $LAUNCH --config_file $CONFIGS/$engine.yaml --num_processes 2 --main_process_port $port \
    -m align_cli.cli train $T $EXTRA "$@" > $W/logs/check-$out.log 2>&1
}
for engine in $ENGINES; do
  tiny $engine $port $engine-straight --output-dir $W/checks/$engine-straight &
  (tiny $engine $((port + 1)) $engine-half --output-dir $W/checks/$engine-resumed --set training.max_steps=2 \
   && tiny $engine $((port + 3)) $engine-resume --output-dir $W/checks/$engine-resumed --resume) &
  tiny $engine $((port + 2)) $engine-lora --output-dir $W/checks/$engine-lora --set peft.enabled=true --set peft.r=8 \
    --set reference.precompute=true --set reference.cache_dir=$W/refcache-$engine &
  port=$((port + 10))
done
wait
for engine in $ENGINES; do
  python3 "$REPO/benchmarks/distributed.py" check --out $W --name $engine --straight $W/checks/$engine-straight \
    --resumed $W/checks/$engine-resumed --lora $W/checks/$engine-lora >> $W/logs/check-report.log 2>&1
  log "check $engine: $(python3 -c "import json; r = json.load(open('$W/checks/$engine.json')); print(json.dumps({k: v for k, v in r.items() if 'losses' not in k}))" 2>&1 | tail -1)"
done
# The online loop last, in what is left of the budget (each run compiles its decode step first, ~35 s):
# 16 prompts x 8 on one GPU, 8 x 8 per process under DDP.
GLIMIT=$(( (${BUDGET:-540} - SECONDS - 30) / 2 )); [ $GLIMIT -gt 150 ] && GLIMIT=150
if [ "$GRPO" = 1 ] && [ $GLIMIT -ge 60 ]; then
  G="$W/grpo.yaml"
  bench grpo-1gpu $GLIMIT env CUDA_VISIBLE_DEVICES=0 $ALIGN train $G --output-dir $W/runs/grpo-1gpu \
    --set method.rl.prompts_per_step=16 $EXTRA
  bench grpo-ddp $GLIMIT $ALIGN train $G --output-dir $W/runs/grpo-ddp $EXTRA --accelerate-config $CONFIGS/ddp.yaml \
    --num-processes 2
  GRPO_RUNS="grpo-1gpu grpo-ddp"
elif [ "$GRPO" = 1 ]; then
  log "online GRPO runs skipped: ${GLIMIT}s each left (GRPO_ONLY=1 ENGINES= runs them in a call of their own)"
fi
python3 "$REPO/benchmarks/distributed.py" report --out $W --runs 1gpu $ENGINES 2node $GRPO_RUNS --checks $ENGINES > $W/logs/report.log 2>&1 || tail -20 $W/logs/report.log >> "$OUT/log.txt"
cp $W/results.json $W/distributed_loss_curves.png "$OUT/" 2>/dev/null
bundle
log "done"
