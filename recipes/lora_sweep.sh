#!/usr/bin/env bash
# LoRA learning-rate sweep for SFT and DPO, on a dev split carved from AmbigSQL's TRAINING pool.
#
# Why: the authors' 2e-5 is a full fine-tuning rate; a rank-16 LoRA on a small model barely moves at
# it. This picks the trainer's LoRA defaults from held-out training conversations, never the test split.
#
#   train sample : N conversations of ambigsql:train, seed SEED (the same sample for every run)
#   dev split    : DEV_N other conversations of ambigsql:train (--exclude-conversations the train sample),
#                  seed DEV_SEED; evaluated greedily, 128 tokens
#   SFT          : trainer sft --lr LR for LR in SFT_LRS, STEPS steps of batch BATCH
#   DPO          : offline DPO on Phase-1 pairs (simkit pairs build on the train sample) --lr LR for LR in
#                  DPO_LRS, STEPS steps of batch DPO_BATCH; the same pairs in the same order for every LR
#
# usage: recipes/lora_sweep.sh [MODEL_DIR] [OUT_DIR]    (defaults: runs/models/smollm2 runs/lora-sweep)
# Resumable: finished stages (adapter / metrics.json present) are skipped. Log: OUT/sweep.log.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/children.sh"  # a stop signal, a failing step or the end stops every child
MODEL=${1:-runs/models/smollm2}
OUT=${2:-runs/lora-sweep}
N=${N:-48}; SEED=${SEED:-0}; DEV_N=${DEV_N:-40}; DEV_SEED=${DEV_SEED:-1}
EPOCHS=${EPOCHS:-2}; BATCH=${BATCH:-4}
STEPS=${STEPS:-8}  # optimizer steps per run: the regime the demo trains in on a 2-core CPU
DPO_BATCH=${DPO_BATCH:-$BATCH}
SFT_LRS=${SFT_LRS:-"2e-5 2e-4 1e-3"}
DPO_LRS=${DPO_LRS:-"5e-6 5e-5 5e-4"}
PORT=${PORT:-8012}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT/logs"
MODEL=$(cd "$MODEL" && pwd)
URL=http://127.0.0.1:$PORT/v1
log() { echo "$(date -Is) $*" | tee -a "$OUT/sweep.log"; }
run() { local f=$1; shift; log "RUN $*"; local t0=$SECONDS; run_child "$@" >>"$OUT/logs/$f" 2>&1; log "DONE in $((SECONDS - t0))s: $f"; }
load() { curl -sf "$URL/load_lora_adapter" -H 'Content-Type: application/json' \
           -d "{\"lora_name\":\"$1\",\"lora_path\":\"$(cd "$2" && pwd)\",\"load_inplace\":true}" >/dev/null; }
dev_eval() {  # dev_eval NAME LABEL [--policy-model M]
  local name=$1 label=$2; shift 2
  [[ -f $OUT/$name/metrics.json ]] && return 0
  run "$name.log" "$PY" -m simkit.cli eval --env ambigsql --split train --exclude-conversations "$OUT/train_sample.json" \
      --n-conversations "$DEV_N" --seed "$DEV_SEED" --policy "$URL" --out "$OUT/$name" --label "$label" "$@"
}

log "sweep: model $MODEL, N=$N seed=$SEED, $STEPS steps of $BATCH, dev $DEV_N seed=$DEV_SEED, SFT lrs [$SFT_LRS], DPO lrs [$DPO_LRS]"
start_child "$PY" -m simkit.cli model-server --model "$MODEL" --port "$PORT" >>"$OUT/logs/model_server.log" 2>&1
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 1; done

# the training sample, recorded once (the dev split leaves it out)
if [[ ! -f $OUT/dpref.jsonl ]]; then
  run pairs.log "$PY" -m simkit.cli pairs build --env ambigsql --split train --n-conversations "$N" --seed "$SEED" \
      --policy "$URL" --out "$OUT/dpref.jsonl"
fi
cp "$OUT/dpref.conversations.json" "$OUT/train_sample.json" 2>/dev/null || cp "$OUT"/dpref*.conversations.json "$OUT/train_sample.json"

dev_eval dev-base "base"
for lr in $SFT_LRS; do
  d=$OUT/sft-$lr
  [[ -f $d/adapter/adapter_config.json ]] || run "sft-$lr.log" "$PY" -m trainer.cli sft --model "$MODEL" --env ambigsql \
      --split train --n-conversations "$N" --sample-seed "$SEED" --epochs "$EPOCHS" --max-steps "$STEPS" \
      --batch-size "$BATCH" --lr "$lr" \
      --out "$d" --no-tensorboard
  load "sft-$lr" "$d/adapter"
  dev_eval "dev-sft-$lr" "SFT lr=$lr" --policy-model "sft-$lr"
done
for lr in $DPO_LRS; do
  d=$OUT/dpo-$lr
  if [[ ! -f $d/DONE ]]; then
    rm -rf "$d"; mkdir -p "$d"
    "$PY" -c "import json,sys; from simkit.queue import open_queue; from simkit.types import PreferencePair
q = open_queue(sys.argv[2]); q.append([PreferencePair(**json.loads(l)) for l in open(sys.argv[1]) if l.strip()]); q.close()" \
      "$OUT/dpref.jsonl" "$d/q.sqlite"
    run "dpo-$lr.log" "$PY" -m trainer.cli run --model "$MODEL" --queue "$d/q.sqlite" --out "$d/run" --policy-url "$URL" \
        --batch-size "$DPO_BATCH" --lr "$lr" --max-steps "$STEPS" --publish-every 1000 --idle-timeout-s 5 --adapter-name "dpo-$lr" --no-tensorboard
    touch "$d/DONE"
  fi
  adapter=$("$PY" -c "import sys; from simkit.queue import open_queue; q=open_queue(sys.argv[1]); print(q.current_version().adapter)" "$d/q.sqlite")
  dev_eval "dev-dpo-$lr" "DPO lr=$lr" --policy-model "$adapter"
done
"$PY" -m simkit.cli compare "$OUT"/dev-* | tee "$OUT/results.md"
log "sweep finished"
