"""ACT Phase 1 / Phase 2 pair logic on the toy env (offline policies drive the episodes)."""
import pytest

import simkit
from simkit.act import phase1_pair, phase2_rollout
from simkit.types import ANSWER, CLARIFY, Reply


class FixedPolicy:
    """A policy that always says the same thing (to force wrong actions / wrong answers)."""

    def __init__(self, text):
        self.text, self.seen = text, []

    async def respond(self, messages, instruction=None, task=None, **kw):
        self.seen.append(instruction)
        return Reply(text=self.text, model="fixed")


@pytest.fixture
def env():
    return simkit.make("toy", size=4)


async def test_phase1_reference_beats_forced_opposite_action(env):
    clarify_task, answer_task = env.tasks("train")[:2]
    pol = FixedPolicy("whatever")
    p = await phase1_pair(env, clarify_task, pol, version=3)
    assert p.gold_action == CLARIFY and p.rejected_action == ANSWER
    assert "Answer the user's request directly" in pol.seen[-1]  # forced to take the rejected action
    assert p.chosen[0].content == clarify_task.reference and p.rejected[0].content == "whatever"
    assert p.prompt[0].role == "system" and p.prompt[1:] == clarify_task.prompt
    assert p.policy_version == 3 and p.adapter == "fixed" and p.phase == 1
    q = await phase1_pair(env, answer_task, pol)
    assert q.rejected_action == CLARIFY and "clarifying question" in pol.seen[-1]
    assert (await phase1_pair(env, clarify_task, pol, version=3)).id == p.id  # deterministic ids


async def test_phase2_outcomes(env):
    clarify_task, answer_task = env.tasks("train")[:2]
    base_c = await phase1_pair(env, clarify_task, FixedPolicy("It is 5 meters."))
    base_a = await phase1_pair(env, answer_task, FixedPolicy("Which one?"))

    # right action + successful simulated trajectory -> the trajectory wins
    r = await phase2_rollout(env, base_c, clarify_task, simkit.OraclePolicy(), version=1)
    assert r.pair.source == "trajectory-success"
    assert [m.role for m in r.pair.chosen] == ["assistant", "user", "assistant"]
    assert r.pair.rejected == base_c.rejected and r.pair.policy_version == 1 and r.pair.phase == 2

    # wrong implicit action -> the sample loses against the reference
    r = await phase2_rollout(env, base_c, clarify_task, FixedPolicy("It is 20 meters."))
    assert r.pair.source == "wrong-action" and r.pair.rejected[0].content == "It is 20 meters."
    assert r.pair.chosen == base_c.chosen and r.trajectory.info["right_action"] is False

    # right action, wrong content -> the trajectory loses
    r = await phase2_rollout(env, base_a, answer_task, FixedPolicy("no idea"))
    assert r.pair.source == "trajectory-failure" and r.pair.rejected[0].content == "no idea"

    # ablation: sampling without simulation judges by action only
    r = await phase2_rollout(env, base_c, clarify_task, simkit.OraclePolicy(), simulate=False)
    assert r.pair.source == "right-action" and len(r.pair.chosen) == 1 and len(r.trajectory.assistant_turns) == 1
