"""The gym-style env API on the built-in toy env (no server needed)."""
import asyncio
import contextlib

import pytest

import simkit
from simkit.types import ANSWER, CLARIFY


async def test_reset_step_clarify_then_answer():
    env = simkit.make("toy", size=4)
    task = env.tasks("train")[0]
    assert task.gold_action == CLARIFY
    obs = await env.reset(task)
    assert obs[0].role == "system" and obs[-1].content == task.prompt[-1].content
    step = await env.step("Which one do you mean?")
    assert step.info["action"] == CLARIFY and not step.terminated and step.observation == task.user_reply
    step = await env.step(f"It is {task.goal}.")
    assert step.terminated and step.info["action"] == ANSWER and step.reward > 0.5
    traj = env.current.trajectory()
    assert [t.role for t in traj.turns] == ["assistant", "user", "assistant"]
    assert traj.first_action == CLARIFY and traj.reward == step.reward
    with pytest.raises(RuntimeError, match="already ended"):
        await env.step("again")


async def test_turn_cap_truncates_clarify_loops():
    env = simkit.make("toy", size=4, max_turns=2)
    await env.reset(env.tasks("train")[0])
    assert not (await env.step("Which?")).truncated
    last = await env.step("Which one, really?")
    assert last.truncated and not last.terminated and last.reward == 0.0


async def test_wrong_answer_scores_low():
    env = simkit.make("toy", size=4)
    task = env.tasks("train")[1]
    await env.reset(task)
    step = await env.step("no idea")
    assert step.terminated and step.reward == 0.0 and not step.info["success"]


def test_unknown_split_names_the_splits_and_data_loads_on_first_use():
    env = simkit.make("toy", size=4)
    assert env._split_tasks is None  # building an env reads no data
    assert env.splits() == {"train": 4, "test": 1} and env.tasks("train") is env.tasks("train")
    with pytest.raises(KeyError, match=r"toy has splits \['train', 'test'\], not 'dev'"):
        env.tasks("dev")


def test_unknown_env_lists_registered():
    with pytest.raises(KeyError, match="toy"):
        simkit.make("nope")
    assert "toy" in simkit.registered()


async def test_oracle_episodes_through_engine_and_early_break_cancels():
    env = simkit.make("toy", size=100)
    trajs = await simkit.collect(env, env.tasks("train"), simkit.OraclePolicy(), concurrency=16)
    assert len(trajs) == 100 and {t.task_id for t in trajs} == {t.id for t in env.tasks("train")}
    assert all(t.reward == 1.0 and t.terminated for t in trajs)
    n = 0
    async with contextlib.aclosing(simkit.run_episodes(env, env.tasks("train"), simkit.OraclePolicy(),
                                                       concurrency=8)) as it:
        async for _ in it:
            n += 1
            if n == 5:
                break
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
