"""ACT's data side: Phase 1 contrastive action pairs and Phase 2 on-policy trajectory pairs.

Phase 1 (Algorithm 1): y_w = the reference winner, y_l = the policy *forced* to take the other
action. The reference winner of a CLARIFY turn is the whole gold continuation (clarifying
question, the user's clarification, the gold answer; `Task.gold_continuation`), as the authors'
data/base_dataset.py builds it; of an ANSWER turn, the reference answer.

A forced loser is checked (`force_action`): the classifier in use labels it; if it does not take
the rejected action the policy is asked again with a stronger few-shot instruction
(`simkit/prompts/force_*_strong.txt`); if it still does not, the authors' fallback is used — a forced
ANSWER becomes the gold answer, a forced CLARIFY the reply cut at its first "?" (the authors'
post-processing) or, failing that, a template question (`simkit/prompts/[<env>/]fallback_clarify.txt`).
Each pair records its path (`meta["forced_path"]`: forced-ok / retried-ok / fallback). A pair whose
two sides are identical teaches nothing and is dropped (counted by the callers).

Phase 2 (Algorithm 2): sample y_i from the current policy; a wrong implicit action makes y_i
the losing response; a right one is simulated to the end (user simulator answers, policy
continues, round cap) and scored by the env's heuristic against ε: a success becomes y_w, a
failure y_l. Ablations (docs/ACT.md, "Reference results") are one switch each:

* random-actions: a random label replaces the gold action. When it differs from the reference's
  action, the *random* action wins: chosen = the policy forced to take it, rejected = the
  reference (source "random-flip"); Phase 2 then judges samples against the random label.
* no-sampling: D_pref only (offline DPO); no-simulation: Phase 2 judges by the action only.

`irpo_rollout` is the IRPO baseline's pair maker: k samples of the current policy (simulated and
scored like ACT trajectories), the best success against the worst failure.
"""
from __future__ import annotations

import asyncio
import hashlib
import random
from dataclasses import dataclass
from typing import Any, Literal

from . import prompts
from .agents import ActionClassifier
from .client import RoleError
from .engine import PolicyLike, play
from .env import Env, Episode
from .types import ANSWER, CLARIFY, Message, PreferencePair, Task, Trajectory, goal_text, opposite

Ablation = Literal["none", "random-actions", "no-sampling", "no-simulation"]
FORCE_PATHS = ("forced-ok", "retried-ok", "fallback")


def stable_id(*parts: Any) -> str:
    """Deterministic pair id: a restarted producer re-creates the same ids (queue dedups)."""
    return hashlib.sha1("\x1f".join(map(str, parts)).encode()).hexdigest()[:20]


def _assistant(text: str) -> list[Message]:
    return [Message(role="assistant", content=text)]


def identical_sides(pair: PreferencePair) -> bool:
    """chosen == rejected: a pair with no preference in it (dropped and counted)."""
    return [(m.role, m.content.strip()) for m in pair.chosen] == [(m.role, m.content.strip()) for m in pair.rejected]


async def gold_action(task: Task, annotator: ActionClassifier | None = None,
                      rng: random.Random | None = None) -> str:
    """a_i = G(p_i, r_i): the data's label, an LLM annotator's label of the reference, or random."""
    if rng is not None:
        return rng.choice([CLARIFY, opposite(CLARIFY)])
    if annotator is not None:
        return await annotator.classify(task.reference, task)
    return task.gold_action


@dataclass
class Forced:
    """A response that takes a required action, and how it was obtained."""

    text: str
    path: str  # forced-ok | retried-ok | fallback
    attempts: int
    model: str = ""
    fallback: str | None = None  # gold-answer | truncated | template


async def force_action(env: Env, task: Task, policy: Any, action: str, prompt: list[Message],
                       classifier: ActionClassifier | None = None) -> Forced:
    """The policy made to take `action`: instruction, checked; a stronger few-shot instruction,
    checked; then the authors' fallback (see the module docstring)."""
    clf = classifier or env.classifier
    name = "force_clarify" if action == CLARIFY else "force_answer"
    texts, model = [], ""
    for attempt, template in enumerate((name, name + "_strong"), 1):
        reply = await policy.respond(prompt, instruction=prompts.load(template, env=env.name), task=task)
        texts.append(reply.text)
        model = reply.model or model
        if await clf.classify(reply.text, task) == action:
            return Forced(reply.text, "forced-ok" if attempt == 1 else "retried-ok", attempt, model)
    if action == ANSWER:  # authors: the rejected side of a CLARIFY turn is the gold answer
        return Forced(goal_text(task.goal) or task.reference, "fallback", len(texts), model, "gold-answer")
    for text in reversed(texts):  # authors: the forced reply cut at its first "?"
        head = text.split("?")[0].strip()
        if "?" in text and head:
            cut = head + "?"
            if await clf.classify(cut, task) == CLARIFY:
                return Forced(cut, "fallback", len(texts), model, "truncated")
    return Forced(prompts.render("fallback_clarify", env=env.name), "fallback", len(texts), model, "template")


async def phase1_pair(env: Env, task: Task, policy: Any, *, annotator: ActionClassifier | None = None,
                      rng: random.Random | None = None, version: int = 0,
                      classifier: ActionClassifier | None = None) -> PreferencePair:
    """One D_pref entry: the reference winner over the policy forced to take the rejected action
    (with `rng`, the random-actions ablation: a flipped label makes the forced response win)."""
    ref_action = await gold_action(task, annotator)
    action = await gold_action(task, rng=rng) if rng is not None else ref_action
    prompt = env.episode(task).messages
    reference = task.gold_continuation()
    if action == ref_action:
        rejected_action = opposite(action)
        forced = await force_action(env, task, policy, rejected_action, prompt, classifier)
        chosen, rejected, source = reference, _assistant(forced.text), "forced"
    else:  # random label differs from the reference's action: the random action wins
        rejected_action = ref_action
        forced = await force_action(env, task, policy, action, prompt, classifier)
        chosen, rejected, source = _assistant(forced.text), reference, "random-flip"
    return PreferencePair(
        id=stable_id("p1", env.name, task.id, version), prompt=prompt, chosen=chosen, rejected=rejected,
        gold_action=action, rejected_action=rejected_action, policy_version=version, adapter=forced.model,
        env=env.name, task_id=task.id, phase=1, source=source,
        meta={"label_source": "random" if rng else ("annotator" if annotator else "data"),
              "reference_action": ref_action, "data_action": task.gold_action,
              "forced_action": opposite(rejected_action) if source == "random-flip" else rejected_action,
              "forced_path": forced.path, "forced_attempts": forced.attempts, "fallback": forced.fallback},
    )


@dataclass
class Rollout:
    """What one Phase 2 step produced: the simulated trajectory and the refreshed pair."""

    trajectory: Trajectory
    pair: PreferencePair | None

    @property
    def status(self) -> str:
        return self.trajectory.status

    @property
    def dropped(self) -> str | None:
        """Why a finished episode made no pair (identical sides, no contrast); None otherwise."""
        return self.trajectory.info.get("dropped")


def _failed(traj: Trajectory, e: Exception) -> Rollout:
    """A counted failed episode; `info["failure"]` says whose: "role" (transient: worth a retry)
    or "env" (a hook raised: it would again)."""
    traj.status = "failed"
    traj.error = str(e) if isinstance(e, RoleError) else f"{type(e).__name__}: {e}"
    traj.info["failure"] = "role" if isinstance(e, RoleError) else "env"
    return Rollout(traj, None)


def _drop(traj: Trajectory, reason: str = "identical") -> Rollout:
    traj.info["dropped"] = reason
    return Rollout(traj, None)


def _stamp(traj: Trajectory, version: int) -> Trajectory:
    """Turns stamped by the policy decide the version; `version` only fills in when none is."""
    if traj.policy_version is None:
        traj.policy_version = version
    return traj


async def phase2_rollout(env: Env, base: PreferencePair, task: Task, policy: PolicyLike, *, version: int = 0,
                         epoch: int = 0, simulate: bool = True) -> Rollout:
    """Refresh one D_pref pair with the current policy (ACT Algorithm 2, one turn).

    The engine's episode loop plays it; it stops right after the first reply when that reply is
    judged by its action alone (a wrong action, or no simulation), so the simulator is asked
    only when its answer is used. The pair's version is the oldest one stamped on its turns."""
    ep = env.episode(task)

    def judged_by_action(e: Episode) -> bool:
        return not simulate or e.first_action != base.gold_action

    try:
        await play(ep, policy, until=judged_by_action)
    except Exception as e:  # a role gave up, or an env hook (classify, score, simulate) raised
        return _failed(_stamp(ep.trajectory(), version), e)

    right = ep.first_action == base.gold_action
    traj = _stamp(ep.trajectory(), version)
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
        gold_action=base.gold_action, rejected_action=base.rejected_action, policy_version=traj.policy_version,
        adapter=traj.turns[0].model if traj.turns else "", env=env.name, task_id=task.id, phase=2,
        source=source, score=traj.reward if ep.terminated else None, meta={"epoch": epoch},
    )
    if identical_sides(pair):
        return _drop(traj)
    return Rollout(traj, pair)


async def _simulate(env: Env, task: Task, policy: PolicyLike) -> Trajectory:
    ep = env.episode(task)
    await play(ep, policy)
    return ep.trajectory()


async def irpo_rollout(env: Env, task: Task, policy: Any, *, version: int = 0, epoch: int = 0,
                       samples: int = 4) -> Rollout:
    """IRPO baseline (Pang et al. 2024, as ACT compares against it): `samples` simulated
    trajectories of the current policy, scored by the env's heuristic; the best success is the
    winner, the worst failure the loser. No contrast (all succeed or all fail): no pair."""
    try:
        trajs = await asyncio.gather(*(_simulate(env, task, policy) for _ in range(max(2, samples))))
    except Exception as e:  # a role that gave up or an env hook that raised: a counted failure
        return _failed(env.episode(task).trajectory(policy_version=version), e)
    ok = [t for t in trajs if t.terminated and env.success(t.reward)]
    bad = [t for t in trajs if not (t.terminated and env.success(t.reward))]
    best = max(ok, key=lambda t: t.reward) if ok else trajs[0]
    stamped = [t.policy_version for t in trajs if t.policy_version is not None]
    version = min(stamped) if stamped else version  # the oldest policy that wrote any sample
    best.policy_version = version
    best.info.update(right_action=best.first_action == task.gold_action, source="irpo", success=bool(ok),
                     samples=len(trajs), successes=len(ok))
    if not ok or not bad:
        return _drop(best, "no-contrast")
    worst = min(bad, key=lambda t: t.reward if t.terminated else -1.0)
    pair = PreferencePair(
        id=stable_id("irpo", env.name, task.id, epoch, version), prompt=env.episode(task).messages,
        chosen=best.continuation(), rejected=worst.continuation(), gold_action=task.gold_action,
        rejected_action=None, policy_version=version, adapter=best.turns[0].model if best.turns else "",
        env=env.name, task_id=task.id, phase=2, source="irpo", score=best.reward,
        meta={"epoch": epoch, "samples": len(trajs), "successes": len(ok)})
    if identical_sides(pair):
        return _drop(best)
    return Rollout(best, pair)
