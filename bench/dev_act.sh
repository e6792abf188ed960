#!/usr/bin/env bash
# ACT variants on the dev split, from the sealed run's SFT adapters (issue: SmolLM2 must learn *when* to ask;
# "diagnose on the dev split ... choose every setting on dev"). For each seed, the recipe's n = 100 sync ACT stage
# (recipes/act_recipe.sh, the sealed run's settings: batch 1 x 4, 1 server thread) continues that seed's SFT
# adapter with extra serve flags, then evaluates SFT and ACT greedily on LIMIT dev turns sampled with the seed, and
# pairs them (the recipe's OUT/sS/results.md; each seed has its own dev sample, so seeds are not pooled). Nothing here
# reads the test split. Resumable (the recipe's stages).
#
# usage: NAME=content-base SERVE_ARGS="--content-pairs base" SEEDS="0 1 2" bash bench/dev_act.sh [MODEL_DIR]
#        (SFT adapters from SFT_RUNS=runs/sealed-cpu/sS/n100/sft; results in runs/dev-act/NAME; LIMIT=150;
#        ports 8140+seed). Seeds run one after another; run one seed per invocation to use more cores.
set -euo pipefail
MODEL=${1:-runs/models/smollm2}
NAME=${NAME:?NAME= names the variant (its directory under runs/dev-act)}
OUT=runs/dev-act/$NAME SFT_RUNS=${SFT_RUNS:-runs/sealed-cpu} LIMIT=${LIMIT:-150}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
for s in ${SEEDS:-0 1 2}; do
  sft=$OUT/s$s/n100/sft
  if [[ ! -f $sft/adapter/adapter_config.json ]]; then  # the sealed run's SFT stage, reused (same seed, same data)
    mkdir -p "$sft" && cp -r "$SFT_RUNS/s$s/n100/sft/adapter" "$SFT_RUNS/s$s/n100/sft/conversations.json" "$sft/"
  fi
  SEED=$s NS=100 METHODS=act-sync SKIP_BASE=1 BATCH=1 GRAD_ACCUM=4 PORT=$((8140 + s)) EVAL_SPLIT=dev \
    SERVER_ARGS="--dtype float32 --max-batch 64 --threads 1" SERVE_ARGS="${SERVE_ARGS:-}" \
    EVAL_ARGS="--n-tasks $LIMIT" PYTHON=$PY bash recipes/act_recipe.sh "$MODEL" "$OUT/s$s"
done
for s in ${SEEDS:-0 1 2}; do echo "## seed $s"; cat "$OUT/s$s/results.md"; done
