"""The typed engine and its seams: env hooks that raise are counted failed episodes (also through
`simkit serve`), the serve watermark survives transient failures, the simulator is asked only
when its answer is used, per-turn version stamps, and typed env configs."""
from __future__ import annotations

import argparse
import asyncio
import json

import pytest

import simkit
from simkit.act.contrast import phase1_pair, phase2_rollout
from simkit.roles.client import RoleError
from simkit.engine import PolicyLike, amap, run_episodes
from simkit.env import EnvConfigError
from simkit.loadtools.fakeserver import FakeServer
from simkit.act.pairs import build_pairs
from simkit.queue import AsyncPairQueue, open_queue
from simkit.roles.build import Roles
from simkit.serving.serve import Server, ServeConfig, serve
from simkit.serving import VersionFollower
from environments.toy.env import ToyEnv
from simkit.types import ANSWER, CLARIFY, Reply


@simkit.register("toy-bad-score")
class BadScoreEnv(ToyEnv):
    """The toy task with a scorer that raises (a bug in an env hook)."""

    async def score(self, prediction, target, task):
        raise ZeroDivisionError("scorer bug")


class CountingSimulator:
    description = "counting"

    def __init__(self) -> None:
        self.calls = 0

    async def reply(self, task, dialogue) -> str:
        self.calls += 1
        return task.user_reply or "I mean it."


class ScriptedPolicy:
    """Replies with the texts given, one per call, round-robin per task."""

    model = "scripted"

    def __init__(self, *texts: str) -> None:
        self.texts, self.seen = texts, {}

    async def respond(self, messages, instruction=None, task=None, **sampling) -> Reply:
        i = self.seen.get(task.id, 0)
        self.seen[task.id] = i + 1
        return Reply(text=self.texts[i % len(self.texts)], model=self.model)


class FlakyPolicy:
    """The oracle, except that the first `fails` calls on `task_id` give up like a role would."""

    model = "flaky"

    def __init__(self, task_id: str, fails: int) -> None:
        self.inner, self.task_id, self.fails = simkit.OraclePolicy(), task_id, fails

    async def respond(self, messages, instruction=None, task=None, **sampling) -> Reply:
        if task.id == self.task_id and self.fails > 0:
            self.fails -= 1
            raise RoleError("policy", "503 after 3 retries")
        return await self.inner.respond(messages, instruction, task, **sampling)


def test_policies_satisfy_policy_like():
    assert isinstance(simkit.OraclePolicy(), PolicyLike) and isinstance(ScriptedPolicy("x"), PolicyLike)


async def test_amap_on_error_is_explicit_and_bounded():
    in_flight = peak = 0

    async def fn(x: int) -> int:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        if x % 3 == 0:
            raise ValueError(x)
        return x

    out = [r async for r in amap(fn, range(30), concurrency=4, on_error=lambda x, e: -x)]
    assert sorted(out) == sorted(-x if x % 3 == 0 else x for x in range(30))
    assert peak == 4


async def test_scorer_that_raises_gives_counted_failed_episodes():
    env = simkit.make("toy-bad-score", size=8)
    stats = simkit.engine.EngineStats()
    trajs = [t async for t in run_episodes(env, env.tasks("train"), simkit.OraclePolicy(), stats=stats)]
    assert len(trajs) == 8 and stats.failed == 8
    assert all(t.status == "failed" and "ZeroDivisionError: scorer bug" in t.error for t in trajs)
    assert all(t.turns for t in trajs)  # what was played before the hook raised is kept


async def test_serve_finishes_when_the_scorer_raises(tmp_path):
    async with FakeServer(latency_ms=0) as srv:
        cfg = ServeConfig(env="toy-bad-score", queue=str(tmp_path / "q.db"), run_dir=str(tmp_path / "run"),
                          n_conversations=6, max_epochs=1, poll_s=0.05, concurrency=4,
                          contrast="forced", pairs_per_conversation="one")  # one episode per task
        roles = argparse.Namespace(policy=srv.url, max_tokens=8)
        summary = await asyncio.wait_for(serve(cfg, roles), 60)
    assert summary["episodes"] == 6 and summary["failures"] == 6 and summary["pairs"] == 0
    assert summary["retries"] == 0  # a hook that raised would raise again: no retry
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (state["epoch"], state["position"]) == (1, 0)


async def _serve_oracle(tmp_path, policy, env, dpref, **cfg_kw):
    cfg = ServeConfig(env="toy", queue=str(tmp_path / "q.db"), run_dir=str(tmp_path / "run"), max_epochs=1,
                      poll_s=0.05, concurrency=4, retry_backoff_s=0.0, **cfg_kw)
    (tmp_path / "run").mkdir(exist_ok=True)
    queue = AsyncPairQueue(open_queue(cfg.queue))
    server = Server(cfg, env, Roles(policy, env.simulator, env.classifier, []), queue)
    server.split = "train"
    try:
        summary = await asyncio.wait_for(server.run(dpref), 60)
    finally:
        await queue.close()
    return summary, server


@pytest.mark.parametrize("fails, failures", [(1, 0), (10, 1)])
async def test_watermark_advances_after_transient_failures_and_restart_redoes_nothing(tmp_path, fails, failures):
    env = simkit.make("toy", size=12)
    tasks = env.tasks("train")
    dpref, _ = await build_pairs(env, tasks, simkit.OraclePolicy(), progress=False)
    flaky = FlakyPolicy(dpref[3].task_id, fails)
    summary, server = await _serve_oracle(tmp_path, flaky, env, dpref)
    assert summary["episodes"] == len(dpref) and summary["failures"] == failures
    assert summary["retries"] == min(fails, 2)
    assert server.cursor.parked == 0
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert (state["epoch"], state["position"]) == (1, 0)  # nothing left below the watermark

    again, _ = await _serve_oracle(tmp_path, simkit.OraclePolicy(), env, dpref)
    assert again["episodes"] == 0


async def test_no_simulator_call_when_the_reply_is_discarded():
    sim = CountingSimulator()
    env = simkit.make("toy", size=8, simulator=sim)
    clarify_task = next(t for t in env.tasks("train") if t.gold_action == CLARIFY)
    answer_task = next(t for t in env.tasks("train") if t.gold_action == ANSWER)

    def asks() -> ScriptedPolicy:  # asks first, then answers
        return ScriptedPolicy("Which one do you mean?", "20 meters")

    base_answer = await phase1_pair(env, answer_task, simkit.OraclePolicy())
    base_clarify = await phase1_pair(env, clarify_task, simkit.OraclePolicy())

    wrong = await phase2_rollout(env, base_answer, answer_task, asks())  # asks where it should answer
    assert wrong.trajectory.info["source"] == "wrong-action" and sim.calls == 0
    no_sim = await phase2_rollout(env, base_clarify, clarify_task, asks(), simulate=False)
    assert no_sim.trajectory.info["source"] == "right-action" and sim.calls == 0
    simulated = await phase2_rollout(env, base_clarify, clarify_task, asks())  # control: the answer is used
    assert simulated.trajectory.info["source"].startswith("trajectory-") and sim.calls == 1


class SwitchingClient:
    """A role client stub: while the first request is out, the trainer publishes version 2 and
    serve's follower switches the policy."""

    def __init__(self, on_first) -> None:
        self.on_first, self.calls, self.model = on_first, 0, None

    async def complete(self, messages, model=None, **sampling) -> Reply:
        self.calls += 1
        if self.calls == 1:
            await self.on_first()
            return Reply(text="Do you mean the oak or the tower?", model=model)
        return Reply(text="20 meters", model=model)


async def test_version_stamps_are_per_turn_across_a_mid_episode_switch(tmp_path):
    env = simkit.make("toy", size=8)
    task = next(t for t in env.tasks("train") if t.gold_action == CLARIFY)
    base = await phase1_pair(env, task, simkit.OraclePolicy())
    async with AsyncPairQueue(open_queue(tmp_path / "q.db")) as queue:
        await queue.publish_version(1, "policy-v1")

        async def publish_v2() -> None:
            await queue.publish_version(2, "policy-v2")
            assert await follower.follow()

        policy = simkit.Policy(SwitchingClient(publish_v2))
        follower = VersionFollower(queue, policy)
        assert await follower.follow() and policy.version == 1
        r = await phase2_rollout(env, base, task, policy, version=follower.version)
    asked, answered = r.trajectory.assistant_turns
    assert (asked.policy_version, asked.model) == (1, "policy-v1")
    assert (answered.policy_version, answered.model) == (2, "policy-v2")
    assert r.trajectory.policy_version == 1 and r.pair.policy_version == 1  # the oldest that wrote it


def test_env_config_rejects_unknown_keys_and_names_them():
    with pytest.raises(EnvConfigError, match=r"'max_turn'.*did you mean 'max_turns'"):
        simkit.make("toy", max_turn=1)
    with pytest.raises(EnvConfigError, match="'sizee'"):
        simkit.make("toy", max_turns=1, sizee=3)
    with pytest.raises(EnvConfigError, match="size"):
        simkit.make("toy", size="many")
    env = simkit.make("toy", max_turns=1, size=3)
    assert env.max_turns == 1 and env.splits() == {"train": 3, "test": 1} and env.config.size == 3
