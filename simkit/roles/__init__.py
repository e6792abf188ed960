"""The three LLM roles of an episode (policy, user simulator, action classifier) and how they talk
to OpenAI-compatible servers: `agents` (what each role does), `client` (one client per role, with
retries and back-pressure), `transport` (the HTTP layer), `build` (role settings -> clients)."""
