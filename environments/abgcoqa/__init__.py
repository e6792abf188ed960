"""Abg-CoQA environment: `simkit.make("abgcoqa")` (splits `tune`, `eval`)."""
from .env import AbgCoqaEnv

__all__ = ["AbgCoqaEnv"]
