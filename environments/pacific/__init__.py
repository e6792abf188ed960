"""PACIFIC environment: `simkit.make("pacific")` (splits `tune`, `eval`)."""
from .env import PacificEnv

__all__ = ["PacificEnv"]
