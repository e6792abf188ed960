#!/usr/bin/env bash
# The sealed-test table from the committed evidence: export each finished seed's SFT and ACT evals of
# bench/cpu_sealed.sh (or bench/gpu_sealed.sh) into bench/results/ (compact per-task rows, the command in
# each header), then `simkit compare` the base, the text classifier, SFT and ACT (seeds pooled) with paired
# differences against the base, SFT and the text classifier. Every number is recomputed from the committed files.
#
# usage: bash bench/sealed_report.sh [RUNS_DIR]      (default runs/sealed-cpu; seeds found as RUNS/sS)
#        writes bench/results/sealed_compare.md and .json
set -euo pipefail
RUNS=${1:-runs/sealed-cpu}
PY=${PYTHON:-.venv/bin/python}
R=bench/results
sft=() act=()
for d in "$RUNS"/s*/; do
  s=${d%/}; s=${s##*/s}
  for kind in sft act-sync; do
    ev="$d/n100/$kind/eval"
    [[ -f $ev/metrics.json ]] || continue
    name=${kind%-sync}
    out="$R/${name}_n100_s${s}_sealed.jsonl"
    "$PY" -m simkit.cli results export "$ev" --out "$out" >/dev/null  # the header keeps the eval's command
    if [[ $name == sft ]]; then sft+=("$out"); else act+=("$out"); fi
  done
done
join() { local IFS=,; echo "$*"; }
tc=$(join "$R"/textclf_n100_s*_sealed.jsonl)
args=("$R/base_smollm2_sealed.jsonl" --group "text classifier n=100=$tc")
[[ ${#sft[@]} -gt 0 ]] && args+=(--group "SFT n=100=$(join "${sft[@]}")")
[[ ${#act[@]} -gt 0 ]] && args+=(--group "ACT (sync) n=100=$(join "${act[@]}")")
args+=(--vs base)
[[ ${#sft[@]} -gt 0 ]] && args+=(--vs "SFT n=100")
[[ ${#act[@]} -gt 0 ]] && args+=(--vs "text classifier n=100")  # the bar: ACT at least the classifier's Macro F1
"$PY" -m simkit.cli compare "${args[@]}" --json "$R/sealed_compare.json" | tee "$R/sealed_compare.md"
echo "seeds: SFT ${#sft[@]}, ACT ${#act[@]} (bench/results/sealed_compare.md)"
