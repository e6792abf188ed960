#!/usr/bin/env bash
# SFT capacity on the dev split (issue: SmolLM2 must learn *when* to ask; "LoRA capacity: try r16, r64 and full
# fine-tuning at least for SFT"). The n = 100 recipe's SFT (8 epochs, batch 1 x 4, the seed's conversation
# sample) with a rank-16 LoRA, a rank-64 LoRA (alpha 2r, as r16) and every weight (lr 2e-5, the authors'),
# each measured on the same seeded dev turns twice:
#   bench/action_first_token.py   first-token P(question opener), its AUROC between gold-CLARIFY and gold-ANSWER
#                                 turns, the first-token decision's ask rates and J
#   simkit eval --split dev       greedy replies: Macro F1, ask rates, J (the sealed table's columns)
# then `simkit compare` of the evals with the text classifier on the same turns. Resumable: a variant's finished
# SFT / measurement is kept.
#
# usage: VARIANTS="r16 r64 full" SEED=0 LIMIT=150 bash bench/dev_capacity.sh [MODEL_DIR] [RUNS_DIR]
#        (defaults runs/models/smollm2 runs/dev-capacity; PORT=8130). A variant NAME=DIR measures a finished
#        LoRA adapter or full model instead of training one, e.g. "r16=runs/sealed-cpu/s0/n100/sft/adapter
#        act=runs/sealed-cpu/s0/n100/act-sync/train/adapters/ID/v000050" (the sealed run's seed-0 SFT and ACT).
set -euo pipefail
MODEL=${1:-runs/models/smollm2}
RUNS=${2:-runs/dev-capacity}
SEED=${SEED:-0} LIMIT=${LIMIT:-150} PORT=${PORT:-8130}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$RUNS"
log() { echo "$(date -Is) $*" | tee -a "$RUNS/capacity.log"; }
server=
stop_server() { [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null; server=; }
trap 'stop_server' EXIT
trap 'stop_server; exit 143' INT TERM

evals=()
for spec in ${VARIANTS:-r16 r64 full}; do
  v=${spec%%=*}
  dir=$RUNS/s$SEED/$v; mkdir -p "$dir"
  case $spec in
    *=*)  out=${spec#*=} ;;
    r16)  args=() out=$dir/sft/adapter ;;
    r64)  args=(--lora-r 64 --lora-alpha 128) out=$dir/sft/adapter ;;
    full) args=(--full-finetune --lr 2e-5) out=$dir/sft/model ;;
    *) echo "unknown variant $spec (r16, r64, full or NAME=DIR)" >&2; exit 2 ;;
  esac
  if [[ $spec != *=* && ! -f $out/config.json && ! -f $out/adapter_config.json ]]; then
    rm -rf "$dir/sft"
    log "START sft $v seed=$SEED"; t0=$SECONDS
    "$PY" -m trainer.cli sft --env ambigsql --split train --n-conversations 100 --seed "$SEED" --model "$MODEL" \
      --out "$dir/sft" --batch-size 1 --grad-accum 4 --no-tensorboard "${args[@]}" > "$dir.sft.log" 2>&1
    log "DONE  sft $v wall=$((SECONDS - t0))s"
  fi
  full=0; [[ -f $out/adapter_config.json ]] || full=1   # a LoRA adapter, or a whole model
  # measurement 1: the first token (no server)
  if [[ ! -f $dir/first_token.json ]]; then
    log "START first-token $v"; t0=$SECONDS
    if [[ $full == 1 ]]; then ft=(--model "$out"); else ft=(--model "$MODEL" --adapter "$v=$out" --skip-base); fi
    "$PY" bench/action_first_token.py "${ft[@]}" --split dev --limit "$LIMIT" --seed "$SEED" \
      --json "$dir/first_token.json" > "$dir.first_token.log" 2>&1
    log "DONE  first-token $v wall=$((SECONDS - t0))s"
  fi
  # measurement 2: greedy eval on the same dev turns
  if [[ ! -f $dir/eval/metrics.json ]]; then
    log "START eval $v"; t0=$SECONDS
    served=$MODEL; [[ $full == 1 ]] && served=$out
    "$PY" -m simkit.cli model-server --model "$served" --port "$PORT" --dtype float32 --threads 1 \
      --max-lora-rank 64 > "$dir.server.log" 2>&1 &
    server=$!
    url=http://127.0.0.1:$PORT/v1
    until curl -sf "$url/models" >/dev/null; do kill -0 "$server" || { echo "server died: $dir.server.log" >&2; exit 1; }; sleep 2; done
    name=()
    if [[ $full == 0 ]]; then
      curl -sf "$url/load_lora_adapter" -H 'Content-Type: application/json' \
        -d "{\"lora_name\": \"$v\", \"lora_path\": \"$(cd "$out" && pwd)\"}" >/dev/null
      name=(--policy-model "$v")
    fi
    "$PY" -m simkit.cli eval --env ambigsql --split dev --n-tasks "$LIMIT" --seed "$SEED" --policy "$url" "${name[@]}" \
      --label "$v n=100" --out "$dir/eval" > "$dir.eval.log" 2>&1
    stop_server
    log "DONE  eval $v wall=$((SECONDS - t0))s"
  fi
  evals+=("$dir/eval")
done
tc=$RUNS/s$SEED/textclf
[[ -f $tc/metrics.json ]] || "$PY" -m simkit.cli textclf --env ambigsql --n-conversations 100 --seed "$SEED" --split dev \
  --n-tasks "$LIMIT" --eval-seed "$SEED" --out "$tc" > "$tc.log" 2>&1
evals+=("$tc")
"$PY" -m simkit.cli compare "${evals[@]}" --json "$RUNS/s$SEED/compare.json" | tee "$RUNS/s$SEED/compare.md"
