"""simkit's trainer (`trainer run | sft | plot`): queue-fed DPO with a LoRA adapter, hot-published
into the policy servers, and the SFT baseline on the same code path.

Modules: `cli` (commands), `config` (pydantic configs, YAML + flags), `dpo` (queue-fed DPOTrainer
and the run loop), `data` (queue → tokenised examples), `ledger` (exactly-once commits and
resume), `publish` (adapter versions → servers → queue), `sft`, `metrics` (JSONL + TensorBoard),
`plot`, `models` (loading, LoRA, precision, merging), `synthetic` (toy pairs for tests/benches).
"""
