"""AmbigSQL: Spider questions made ambiguous (information / population / presentation), for
ACT's clarify-or-answer training, with sandboxed execution-match scoring.

Importing this package registers the `ambigsql` environment (`simkit.make("ambigsql")`).
See README.md in this folder.
"""
from .env import AmbigSQLEnv

__all__ = ["AmbigSQLEnv"]
