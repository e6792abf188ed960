"""ACT's data side: Phase 1 contrastive action pairs and Phase 2 on-policy trajectory pairs.

Phase 1 (Algorithm 1): y_w = the reference r_i, y_l = the policy *forced* to take the other
action (templates `prompts/force_clarify.txt`, `prompts/force_answer.txt`).
Phase 2 (Algorithm 2): sample y_i from the current policy; a wrong implicit action makes y_i
the losing response; a right one is simulated to the end (user simulator answers, policy
continues, turn cap) and scored by the env's heuristic against ε: a success becomes y_w, a
failure y_l. Ablations (ACT.md) are one switch each.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

from . import prompts
from .agents import ActionClassifier
from .client import RoleError
from .env import Env
from .types import CLARIFY, Message, PreferencePair, Task, Trajectory, opposite

Ablation = Literal["none", "random-actions", "no-sampling", "no-simulation"]


def stable_id(*parts: Any) -> str:
    """Deterministic pair id: a restarted producer re-creates the same ids (queue dedups)."""
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:20]


def _assistant(text: str) -> list[Message]:
    return [Message(role="assistant", content=text)]


async def gold_action(task: Task, annotator: ActionClassifier | None = None,
                      rng: random.Random | None = None) -> str:
    """a_i = G(p_i, r_i): the data's label, an LLM annotator's label of the reference, or random."""
    if rng is not None:
        return rng.choice([CLARIFY, opposite(CLARIFY)])
    if annotator is not None:
        return await annotator.classify(task.reference, task)
    return task.gold_action


async def phase1_pair(env: Env, task: Task, policy: Any, *, annotator: ActionClassifier | None = None,
                      rng: random.Random | None = None, version: int = 0) -> PreferencePair:
    """One D_pref entry: reference wins over the policy forced to take the rejected action."""
    action = await gold_action(task, annotator, rng)
    rejected_action = opposite(action)
    instruction = prompts.load("force_clarify" if rejected_action == CLARIFY else "force_answer", env=env.name)
    prompt = env.episode(task).messages
    losing = await policy.respond(prompt, instruction=instruction, task=task)
    return PreferencePair(
        id=stable_id("p1", env.name, task.id, version), prompt=prompt, chosen=_assistant(task.reference),
        rejected=_assistant(losing.text), gold_action=action, rejected_action=rejected_action,
        policy_version=version, adapter=losing.model, env=env.name, task_id=task.id, phase=1, source="forced",
        meta={"label_source": "random" if rng else ("annotator" if annotator else "data")},
    )


@dataclass
class Rollout:
    """What one Phase 2 step produced: the simulated trajectory and the refreshed pair."""

    trajectory: Trajectory
    pair: PreferencePair | None

    @property
    def status(self) -> str:
        return self.trajectory.status


async def phase2_rollout(env: Env, base: PreferencePair, task: Task, policy: Any, *, version: int = 0,
                         epoch: int = 0, simulate: bool = True) -> Rollout:
    """Refresh one D_pref pair with the current policy (ACT Algorithm 2, one turn)."""
    ep = env.episode(task)
    try:
        reply = await policy.respond(ep.messages, task=task)
        await ep.step(reply.text, reply)
        right = ep.first_action == base.gold_action
        if right and simulate:
            while not ep.done:
                reply = await policy.respond(ep.messages, task=task)
                await ep.step(reply.text, reply)
    except RoleError as e:
        return Rollout(ep.trajectory(status="failed", error=str(e), policy_version=version), None)

    traj = ep.trajectory(policy_version=version)
    sampled = traj.continuation()
    if not right:
        chosen, rejected, source = base.chosen, sampled[:1], "wrong-action"
    elif not simulate:
        chosen, rejected, source = sampled[:1], base.rejected, "right-action"
    elif ep.terminated and env.success(ep.reward):
        chosen, rejected, source = sampled, base.rejected, "trajectory-success"
    else:
        chosen, rejected, source = base.chosen, sampled, "trajectory-failure"
    traj.info.update(right_action=right, source=source, success=bool(ep.terminated and env.success(ep.reward)))
    pair = PreferencePair(
        id=stable_id("p2", env.name, task.id, epoch), prompt=base.prompt, chosen=chosen, rejected=rejected,
        gold_action=base.gold_action, rejected_action=base.rejected_action, policy_version=version,
        adapter=traj.turns[0].model if traj.turns else "", env=env.name, task_id=task.id, phase=2,
        source=source, score=traj.reward if ep.terminated else None, meta={"epoch": epoch},
    )
    return Rollout(traj, pair)
