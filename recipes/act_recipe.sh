#!/usr/bin/env bash
# ACT on AmbigSQL, the paper's comparison on one model:
#
#   for n in 50 100 training conversations (the same seeded, stratified sample for every method):
#     SFT baseline                       trainer sft --n-conversations n
#     ACT, sync schedule (the paper's)   simkit serve --sync      ‖ trainer run --sync
#     ACT, async schedule                simkit serve             ‖ trainer run --publish-every P
#     ablation random-actions            simkit serve --ablation random-actions   (schedule: $ABLATION_SCHEDULE)
#     ablation no-sampling               simkit serve --ablation no-sampling → trainer run (offline DPO on D_pref)
#     ablation no-simulation             simkit serve --ablation no-simulation    (schedule: $ABLATION_SCHEDULE)
#     IRPO baseline                      rounds of: simkit serve --mode irpo (one pass with the current policy)
#                                        → trainer run --rpo-alpha A (DPO + A x NLL of the chosen) until drained
#   plus the base model; each evaluated with `simkit eval` on the test split, all gathered by
#   `simkit compare` into OUT/results.md (and OUT/vs_n.png).
#
# usage: recipes/act_recipe.sh [MODEL_DIR] [OUT_DIR]        (defaults: runs/models/smollm2 runs/recipe-ambigsql)
#
# Resumable: a stage whose output exists is skipped (SFT: sft/adapter; ACT/IRPO training: a DONE file written
# after the trainer exits 0; eval: eval/metrics.json); an interrupted stage is simply run again (serve and
# trainer resume from their run directories). Every stage's command, seed and wall time go to OUT/recipe.log,
# its output to OUT/logs/ (training: the variant directory's serve.log / train.log).
#
# Settings (environment variables):
#   NS="50 100"           training conversations per run (AmbigSQL: one turn per conversation)
#   METHODS="act-sync act-async random-actions no-simulation no-sampling irpo"   which trained variants to run
#                         (SFT and the base model always run); a subset fits a small machine's time
#   SEED=0                seed of the conversation sample, task order and training (same for every method)
#   TRAIN_PROCS=1         data-parallel trainer processes (GPUs): >1 runs `accelerate launch --multi_gpu
#                         --num_processes TRAIN_PROCS -m trainer.cli run` (rank 0 leases, acks, commits, publishes)
#   BATCH=4 GRAD_ACCUM=1  trainer batch (per process); EPOCHS=2 passes over the n conversations for ACT (the authors' 2)
#   ACT_STEPS=            DPO steps per ACT run (default ceil(EPOCHS * n / (BATCH * GRAD_ACCUM)))
#   SFT_EPOCHS=8          the authors' SFT baseline
#   PUBLISH_EVERY=5       async schedule: a new policy version every P steps
#   ABLATION_SCHEDULE=sync  schedule of the random-actions and no-simulation ablations (sync|async)
#   IRPO_ROUNDS=3 IRPO_SAMPLES=4 RPO_ALPHA=1.0
#   ROLLOUT_MAX_TOKENS=128  policy completion cap of training rollouts (serve); eval decodes greedily, 128 tokens
#   INIT=sft              where ACT, its ablations and IRPO start: sft = continue the SFT n adapter (trainer run
#                         --init-adapter; rollouts start from it; DPO's reference is that adapter), base = a fresh
#                         LoRA on the base model. A 135M base model cannot write SQL at all, so from base its
#                         wrong-action losers are prose, never SQL, and DPO learns "SQL beats a question"
#                         everywhere (bench/RESULTS.md); from SFT both sides are well-formed.
#   TRAIN_ARGS=""         extra flags for trainer sft / run, e.g. "--lr 1e-4 --lora-r 16 --lora-alpha 32"
#   ROLE_ARGS=""          extra role flags for serve and eval, e.g. "--simulator URL --classifier URL"
#   SERVE_ARGS=""         extra flags for the training rollouts (serve) only, e.g. "--concurrency 8 --max-pending 16"
#                         on a CPU box, so that rollouts leave the trainer its share of the cores
#   EVAL_ARGS=""          extra flags for eval, e.g. "--n-tasks 300"
#   EVAL_SPLIT=test       the split every eval runs on; dev for choosing settings (bench/dev_act.sh)
#   POLICY_URL=           a running policy server that loads LoRA adapters (vLLM --enable-lora, or simkit
#                         model-server); default: start `simkit model-server --model MODEL --port PORT`
#   SKIP_BASE=0           1: no base-model eval (greedy, so one seed's is every seed's; other seeds skip it)
#   SERVER_ARGS=""        extra flags for the policy server the recipe starts, e.g. "--dtype float32"
#   PORT=8011 PYTHON=     (default: .venv/bin/python when present, else python)
#   CHILD_GRACE=60        seconds a child (server, serve, trainer) gets to stop on SIGTERM before SIGKILL
#
# Ctrl-C, SIGTERM, SIGHUP, a failing step or the end stops every process the recipe started (recipes/children.sh).
set -euo pipefail
# every child runs through start_child / run_child: a stop signal, a failing step or the end stops them all
source "$(dirname "${BASH_SOURCE[0]}")/children.sh"

MODEL=${1:-runs/models/smollm2}
OUT=${2:-runs/recipe-ambigsql}
ENV_NAME=ambigsql
TRAIN_SPLIT=train
EVAL_SPLIT=${EVAL_SPLIT:-test}
NS=${NS:-"50 100"}
METHODS=${METHODS:-"act-sync act-async random-actions no-simulation no-sampling irpo"}
SEED=${SEED:-0}
BATCH=${BATCH:-4}
GRAD_ACCUM=${GRAD_ACCUM:-1}
TRAIN_PROCS=${TRAIN_PROCS:-1}
EPOCHS=${EPOCHS:-2}
ACT_STEPS=${ACT_STEPS:-}
SFT_EPOCHS=${SFT_EPOCHS:-8}
PUBLISH_EVERY=${PUBLISH_EVERY:-5}
ABLATION_SCHEDULE=${ABLATION_SCHEDULE:-sync}
IRPO_ROUNDS=${IRPO_ROUNDS:-3}
IRPO_SAMPLES=${IRPO_SAMPLES:-4}
RPO_ALPHA=${RPO_ALPHA:-1.0}
INIT=${INIT:-sft}
ROLLOUT_MAX_TOKENS=${ROLLOUT_MAX_TOKENS:-128}
TRAIN_ARGS=${TRAIN_ARGS:-}
ROLE_ARGS=${ROLE_ARGS:-}
SERVE_ARGS=${SERVE_ARGS:-}
EVAL_ARGS=${EVAL_ARGS:-}
POLICY_URL=${POLICY_URL:-}
SKIP_BASE=${SKIP_BASE:-0}
SERVER_ARGS=${SERVER_ARGS:-}
PORT=${PORT:-8011}
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi

[[ -e $MODEL ]] || { echo "model directory $MODEL not found" >&2; exit 2; }
case $ABLATION_SCHEDULE in sync|async) ;; *) echo "ABLATION_SCHEDULE must be sync or async" >&2; exit 2;; esac
case $INIT in sft|base) ;; *) echo "INIT must be sft or base" >&2; exit 2;; esac
mkdir -p "$OUT/logs"
MODEL=$(cd "$MODEL" && pwd)
LOG=$OUT/recipe.log
SIMKIT=("$PYTHON" -m simkit.cli)
TRAINER=("$PYTHON" -m trainer.cli)
TRAINER_RUN=("${TRAINER[@]}")  # the multi-GPU launch: one trainer.cli run per GPU under accelerate (DDP)
if (( TRAIN_PROCS > 1 )); then
  TRAINER_RUN=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$TRAIN_PROCS" -m trainer.cli)
fi
MICRO=$((BATCH * GRAD_ACCUM * TRAIN_PROCS))  # pairs per optimizer step

log() { echo "$(date -Is) $*" | tee -a "$LOG"; }

# run a logged command: its line in recipe.log, its output in the given file
run() {  # run LOGFILE CMD...
  local out=$1; shift
  echo "$(date -Is)     \$ $*" >> "$LOG"
  run_child "$@" >> "$out" 2>&1
}

# one stage: skipped when DONE_PATH exists; command, seed and wall time logged. (Stage functions run
# where `set -e` does not apply, so each of them returns on its first failing command explicitly.)
stage() {  # stage NAME DONE_PATH FUNCTION ARGS...
  local name=$1 done=$2; shift 2
  if [[ -e $done ]]; then
    log "SKIP  $name ($done exists)"
    return 0
  fi
  log "START $name seed=$SEED: $*"
  local t0=$SECONDS rc=0
  "$@" || rc=$?
  if (( rc != 0 )); then
    log "FAIL  $name rc=$rc after $((SECONDS - t0))s (logs: $OUT/logs, the variant's serve.log / train.log)"
    exit "$rc"
  fi
  log "DONE  $name wall=$((SECONDS - t0))s"
}

{
  echo "# $(date -Is) recipe settings"
  for v in MODEL OUT ENV_NAME NS METHODS SEED BATCH GRAD_ACCUM EPOCHS ACT_STEPS SFT_EPOCHS PUBLISH_EVERY ABLATION_SCHEDULE \
           IRPO_ROUNDS IRPO_SAMPLES RPO_ALPHA ROLLOUT_MAX_TOKENS TRAIN_ARGS ROLE_ARGS SERVE_ARGS EVAL_ARGS POLICY_URL SKIP_BASE SERVER_ARGS PORT; do
    echo "$v=${!v}"
  done
} >> "$OUT/settings.txt"

# ------------------------------------------------------------------ policy server
if [[ -z $POLICY_URL ]]; then
  POLICY_URL=http://127.0.0.1:$PORT/v1
  log "START policy server: ${SIMKIT[*]} model-server --model $MODEL --port $PORT $SERVER_ARGS"
  start_child "${SIMKIT[@]}" model-server --model "$MODEL" --port "$PORT" $SERVER_ARGS >> "$OUT/logs/model-server.log" 2>&1
  SERVER_PID=$CHILD  # stopped when the recipe exits (children.sh)
  run_child "$PYTHON" - "$POLICY_URL" "$SERVER_PID" <<'EOF'
import os, sys, time, urllib.request
url, pid = sys.argv[1].rsplit("/v1", 1)[0] + "/health", int(sys.argv[2])
for _ in range(1800):
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the model server exited; see logs/model-server.log")
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        time.sleep(1)
sys.exit("the model server did not come up in 30 minutes")
EOF
  log "DONE  policy server up at $POLICY_URL"
fi

# load an adapter into the policy server (again after a restart: loading is idempotent)
load_adapter() {  # load_adapter NAME PATH
  run_child "$PYTHON" - "$POLICY_URL" "$1" "$2" <<'EOF'
import json, sys, urllib.request
url, name, path = sys.argv[1:]
req = urllib.request.Request(url.rstrip("/") + "/load_lora_adapter", method="POST",
                             data=json.dumps({"lora_name": name, "lora_path": path, "load_inplace": True}).encode(),
                             headers={"Content-Type": "application/json"})
with urllib.request.urlopen(req, timeout=600) as r:
    assert r.status == 200, r.status
EOF
}

# the newest version a queue announces: "ADAPTER PATH" (empty when none)
current_version() {  # current_version QUEUE
  "$PYTHON" - "$1" <<'EOF'
import sys
from pathlib import Path
if Path(sys.argv[1]).exists():
    from simkit.queue import open_queue
    q = open_queue(sys.argv[1])
    v = q.current_version()
    q.close()
    if v is not None:
        print(v.adapter, v.path)
EOF
}

# make sure the queue's current adapter is loaded (serve follows it; eval evaluates it)
ensure_loaded() {  # ensure_loaded QUEUE
  local v
  v=$(current_version "$1") || return
  if [[ -n $v ]]; then load_adapter ${v% *} ${v#* } || return; fi
}

# ------------------------------------------------------------------ stages
sft() {  # sft N DIR
  run "$OUT/logs/sft-n$1.log" "${TRAINER[@]}" sft --env "$ENV_NAME" --split "$TRAIN_SPLIT" --n-conversations "$1" \
    --seed "$SEED" --model "$MODEL" --out "$2" --epochs "$SFT_EPOCHS" --batch-size "$BATCH" \
    --grad-accum "$GRAD_ACCUM" $TRAIN_ARGS || return
}

# INIT=sft: the SFT n adapter is the starting policy (served under sft-nN; the trainer continues it)
start_from() {  # start_from N  → START_SERVE / START_TRAIN arrays
  START_SERVE=(); START_TRAIN=()
  if [[ $INIT == sft ]]; then
    START_SERVE=(--policy-model "sft-n$1")
    START_TRAIN=(--init-adapter "$(cd "$OUT/n$1/sft/adapter" && pwd)")
  fi
}

serve_cmd() {  # serve_cmd N DIR RUN_DIR EXTRA...  → SERVE array
  local n=$1 dir=$2 rundir=$3; shift 3
  start_from "$n"
  if [[ $INIT == sft ]]; then load_adapter "sft-n$n" "$(cd "$OUT/n$n/sft/adapter" && pwd)" || return; fi
  SERVE=("${SIMKIT[@]}" serve --env "$ENV_NAME" --split "$TRAIN_SPLIT" --n-conversations "$n" --seed "$SEED"
         --queue "$dir/queue.sqlite" --run-dir "$rundir" --policy "$POLICY_URL" --max-tokens "$ROLLOUT_MAX_TOKENS"
         "${START_SERVE[@]}" "$@" $SERVE_ARGS $ROLE_ARGS)
}

trainer_cmd() {  # trainer_cmd N DIR ADAPTER STEPS EXTRA...  → TRAIN array
  local n=$1 dir=$2 adapter=$3 steps=$4; shift 4
  start_from "$n"
  TRAIN=("${TRAINER_RUN[@]}" run --model "$MODEL" --queue "$dir/queue.sqlite" --out "$dir/train" --policy-url "$POLICY_URL"
         --adapter-name "$adapter" --max-steps "$steps" --batch-size "$BATCH" --grad-accum "$GRAD_ACCUM"
         --seed "$SEED" --no-tensorboard "${START_TRAIN[@]}" "$@" $TRAIN_ARGS)
}

# serve in the background ‖ trainer in the foreground; serve is stopped (SIGTERM) when the trainer ends
act_online() {  # act_online N DIR ADAPTER STEPS SCHEDULE [SERVE FLAGS...]
  local n=$1 dir=$2 adapter=$3 steps=$4 schedule=$5; shift 5
  mkdir -p "$dir"
  ensure_loaded "$dir/queue.sqlite" || return
  local sflags=() tflags=()
  if [[ $schedule == sync ]]; then
    sflags=(--sync --concurrency "$MICRO" --max-pending "$MICRO"); tflags=(--sync)
  else
    tflags=(--publish-every "$PUBLISH_EVERY" --max-staleness 2)
  fi
  serve_cmd "$n" "$dir" "$dir/serve" "${sflags[@]}" "$@" || return
  trainer_cmd "$n" "$dir" "$adapter" "$steps" "${tflags[@]}"
  echo "$(date -Is)     \$ (background) ${SERVE[*]}" >> "$LOG"
  start_child "${SERVE[@]}" >> "$dir/serve.log" 2>&1
  local spid=$CHILD rc=0
  run "$dir/train.log" "${TRAIN[@]}" || rc=$?
  stop_child "$spid"
  (( rc == 0 )) && touch "$dir/DONE"
  return "$rc"
}

# offline DPO on D_pref: serve appends the Phase 1 pairs once and exits; the trainer drains them
# (one pass: the queue acks each pair once)
act_no_sampling() {  # act_no_sampling N DIR ADAPTER STEPS
  local n=$1 dir=$2 adapter=$3 steps=$4
  mkdir -p "$dir"
  serve_cmd "$n" "$dir" "$dir/serve" --ablation no-sampling || return
  run "$dir/serve.log" "${SERVE[@]}" || return
  trainer_cmd "$n" "$dir" "$adapter" "$steps" --publish-every 1000000 --idle-timeout-s 60
  run "$dir/train.log" "${TRAIN[@]}" || return
  touch "$dir/DONE"
}

# IRPO: each round, one pass of the current policy's own sampled pairs (best success vs worst failure of
# IRPO_SAMPLES samples), then DPO + RPO_ALPHA x NLL until the round's pairs are drained; the trainer
# resumes its run directory across rounds and publishes the round's policy for the next one
irpo() {  # irpo N DIR ADAPTER STEPS_PER_ROUND
  local n=$1 dir=$2 adapter=$3 per=$4 r
  mkdir -p "$dir"
  for ((r = 1; r <= IRPO_ROUNDS; r++)); do
    if [[ -e $dir/round-$r.done ]]; then continue; fi
    log "      IRPO round $r/$IRPO_ROUNDS ($dir)"
    ensure_loaded "$dir/queue.sqlite" || return
    serve_cmd "$n" "$dir" "$dir/serve-r$r" --mode irpo --irpo-samples "$IRPO_SAMPLES" --max-epochs 1 || return
    run "$dir/serve.log" "${SERVE[@]}" || return
    trainer_cmd "$n" "$dir" "$adapter" $((r * per)) --rpo-alpha "$RPO_ALPHA" --publish-every 1000000 \
      --idle-timeout-s 60 --lr-scheduler constant
    run "$dir/train.log" "${TRAIN[@]}" || return
    touch "$dir/round-$r.done"
  done
  touch "$dir/DONE"
}

evaluate() {  # evaluate DIR LABEL MODEL_NAME|"" TRAIN_CONVERSATIONS|""
  local dir=$1 label=$2 name=$3 conv=$4 extra=()
  [[ -n $name ]] && extra+=(--policy-model "$name")
  [[ -n $conv ]] && extra+=(--train-conversations "$conv")
  run "$OUT/logs/eval-$(basename "$(dirname "$dir")")-$(basename "$dir").log" "${SIMKIT[@]}" eval \
    --env "$ENV_NAME" --split "$EVAL_SPLIT" --out "$dir" --label "$label" --policy "$POLICY_URL" --seed "$SEED" \
    "${extra[@]}" $EVAL_ARGS $ROLE_ARGS
}

# evaluate a trained variant: its newest published adapter, loaded (again) into the policy server
evaluate_variant() {  # evaluate_variant VARIANT_DIR LABEL
  local dir=$1 label=$2 v
  v=$(current_version "$dir/queue.sqlite") || return
  [[ -n $v ]] || { echo "no published version in $dir/queue.sqlite" >&2; return 1; }
  load_adapter ${v% *} ${v#* } || return
  local conv=$dir/serve/conversations.json
  [[ -e $conv ]] || conv=$dir/serve-r1/conversations.json
  evaluate "$dir/eval" "$label" "${v% *}" "$conv"
}

evaluate_sft() {  # evaluate_sft SFT_DIR N
  load_adapter "sft-n$2" "$(cd "$1/adapter" && pwd)" || return
  evaluate "$1/eval" "SFT n=$2" "sft-n$2" "$1/conversations.json"
}

# ------------------------------------------------------------------ the runs
EVALS=()
if [[ $SKIP_BASE != 1 ]]; then
  stage "eval base" "$OUT/base/eval/metrics.json" evaluate "$OUT/base/eval" "base (no training)" "" ""
  EVALS+=("$OUT/base/eval")
fi

for n in $NS; do
  R=$OUT/n$n
  steps=${ACT_STEPS:-$(( (EPOCHS * n + MICRO - 1) / MICRO ))}
  per_round=$(( (n + MICRO - 1) / MICRO ))

  stage "sft n=$n" "$R/sft/adapter/adapter_config.json" sft "$n" "$R/sft"
  stage "eval sft n=$n" "$R/sft/eval/metrics.json" evaluate_sft "$R/sft" "$n"
  EVALS+=("$R/sft/eval")

  wants() { [[ " $METHODS " == *" $1 "* ]]; }
  wants act-sync && stage "act-sync n=$n" "$R/act-sync/DONE" act_online "$n" "$R/act-sync" "act-sync-n$n" "$steps" sync
  wants act-async && stage "act-async n=$n" "$R/act-async/DONE" act_online "$n" "$R/act-async" "act-async-n$n" \
    "$steps" async
  wants random-actions && stage "random-actions n=$n" "$R/random-actions/DONE" act_online "$n" "$R/random-actions" \
    "random-actions-n$n" "$steps" "$ABLATION_SCHEDULE" --ablation random-actions
  wants no-simulation && stage "no-simulation n=$n" "$R/no-simulation/DONE" act_online "$n" "$R/no-simulation" \
    "no-simulation-n$n" "$steps" "$ABLATION_SCHEDULE" --ablation no-simulation
  wants no-sampling && stage "no-sampling n=$n" "$R/no-sampling/DONE" act_no_sampling "$n" "$R/no-sampling" \
    "no-sampling-n$n" "$steps"
  wants irpo && stage "irpo n=$n" "$R/irpo/DONE" irpo "$n" "$R/irpo" "irpo-n$n" "$((EPOCHS * per_round))"

  for v in $METHODS; do
    case $v in
      act-sync) label="ACT (sync) n=$n" ;;
      act-async) label="ACT (async) n=$n" ;;
      random-actions) label="ACT random actions n=$n" ;;
      no-simulation) label="ACT w/o simulation n=$n" ;;
      no-sampling) label="ACT w/o on-policy sampling n=$n" ;;
      irpo) label="IRPO n=$n" ;;
      *) echo "unknown method $v in METHODS" >&2; exit 2 ;;
    esac
    stage "eval $v n=$n" "$R/$v/eval/metrics.json" evaluate_variant "$R/$v" "$label"
    EVALS+=("$R/$v/eval")
  done
done

log "START compare: ${SIMKIT[*]} compare ${EVALS[*]} --plot $OUT/vs_n.png"
run_child "${SIMKIT[@]}" compare "${EVALS[@]}" --plot "$OUT/vs_n.png" > "$OUT/results.md"
log "DONE  results: $OUT/results.md"
cat "$OUT/results.md"
