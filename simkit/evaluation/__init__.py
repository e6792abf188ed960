"""Evaluation: `evaluate` (`simkit eval`), `metrics` (the paper's metrics, pure), `stats` (CIs and
paired tests), `results` (per-task rows every number is recomputed from), `compare`
(`simkit compare`) and `textclf` (the text-classifier row)."""
