#!/usr/bin/env bash
# The sealed-test SFT and ACT rows (issue: SmolLM2 must learn *when* to ask) on a CPU box, one seed after
# another: the n = 100 recipe with its defaults (SFT 8 epochs, ACT sync schedule, 50 DPO steps from the SFT
# adapter, the authors' contrast), each eval on the sealed 400-task sample and logged in RUNS/test_evals.jsonl.
# The same runs as bench/gpu_sealed.sh, with one row / pair per forward (BATCH=1 GRAD_ACCUM=4: the same 4 per
# step, no padding). Resumable: the recipe skips finished stages. ~1 hour a seed on 2 cores.
# Threads: the policy server runs one (ACT's rollouts compute beside the trainer), every process's OpenMP
# threads sleep when idle (PASSIVE): with two spinning 2-thread pools on 2 cores a sync DPO step took 4.5
# minutes (bench/RESULTS.md).
#
# usage: SEEDS="0 1 2" bash bench/cpu_sealed.sh [MODEL_DIR] [RUNS_DIR]   (defaults: runs/models/smollm2 runs/sealed-cpu)
set -euo pipefail
MODEL=${1:-runs/models/smollm2}
RUNS=${2:-runs/sealed-cpu}
SEALED=bench/results/sealed_test_ambigsql.json
mkdir -p "$RUNS"
export OMP_WAIT_POLICY=PASSIVE
for s in ${SEEDS:-0 1 2}; do
  SEED=$s NS=100 METHODS=act-sync SKIP_BASE=1 BATCH=1 GRAD_ACCUM=4 PORT=$((8120 + s)) \
    SERVER_ARGS="--dtype float32 --max-batch 64 --threads 1" \
    EVAL_ARGS="--tasks-file $SEALED --test-log $RUNS/test_evals.jsonl" \
    bash recipes/act_recipe.sh "$MODEL" "$RUNS/s$s"
done
