"""`simkit model-server`: an OpenAI-compatible server over transformers with vLLM's runtime
semantics. `server` (HTTP + LoRA endpoints), `batcher` (continuous batching), `kvcache` (prefix
cache), `protocol` (vLLM's request models), `adapter_check` (vLLM's LoRA checks), `info` (what a
policy server is and accepts, from the client side), `fetch` and `tiny` (model folders), `cpu` (what this CPU computes fast)."""
