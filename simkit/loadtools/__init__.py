"""Tools to load and exercise simkit: `loadtest` (`simkit loadtest`), `fakeserver` (a fast fake
OpenAI-compatible target with fault injection) and `testing` (real servers as subprocesses, for
tests, benches and the demo)."""
