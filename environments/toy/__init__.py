"""`toy`: a tiny synthetic clarify-or-answer task, for tests, demos and load tests."""
from environments.toy.env import ToyEnv

__all__ = ["ToyEnv"]
