"""simkit: teach LLMs when to ask a clarifying question (ACT), as an async simulation toolkit."""
import os

# transformers >= 5.2x loads "hub kernels" (code fetched from the Hub at model load and at every
# model.train()) by default on a GPU: offline, as simkit runs here and on most clusters, loading or
# training then fails. Off unless the user turns it on (USE_HUB_KERNELS=YES).
os.environ.setdefault("USE_HUB_KERNELS", "NO")

from simkit.roles.agents import GroundedSimulator, LLMClassifier, LLMSimulator, OraclePolicy, Policy, RuleClassifier
from simkit.roles.client import RoleClient, RoleConfig, RoleError
from simkit.engine import PolicyLike, amap, collect, run_episode, run_episodes
from simkit.env import Env, EnvConfig, EnvConfigError, Episode, StepResult, make, register, registered
from simkit.envserver.remote import RemoteEnv, RemoteEnvError
from simkit.types import ACTIONS, ANSWER, CLARIFY, Message, PreferencePair, Reply, Task, Trajectory, Turn

__version__ = "0.1.0"
__all__ = [
    "ACTIONS", "ANSWER", "CLARIFY", "Env", "EnvConfig", "EnvConfigError", "Episode", "GroundedSimulator", "LLMClassifier", "LLMSimulator",
    "Message", "OraclePolicy", "Policy", "PolicyLike", "PreferencePair", "RemoteEnv", "RemoteEnvError", "Reply", "RoleClient", "RoleConfig", "RoleError",
    "RuleClassifier", "StepResult", "Task", "Trajectory", "Turn", "amap", "collect", "make", "register", "registered",
    "run_episode", "run_episodes",
]
