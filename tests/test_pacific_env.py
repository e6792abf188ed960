"""PACIFIC loader, prompt rendering and end-to-end episodes on the real shared data."""
import argparse
import random
from collections import Counter

import simkit
from environments.pacific.loader import answer_text, load_dialogues, split_of
from environments.pacific.tatqa_metric import official_em_f1
from simkit.types import ANSWER, CLARIFY, Reply


class ReferenceThenGoal:
    """The data's own behaviour: reply r_i first; after a clarification exchange, reply g_i."""

    model = "reference"

    async def respond(self, messages, instruction=None, task=None, **sampling):
        own = sum(m.role == "assistant" for m in messages) - sum(m.role == "assistant" for m in task.prompt)
        return Reply(text=task.reference if own == 0 else str(task.goal), model=self.model)


class Fixed:
    model = "fixed"

    def __init__(self, text):
        self.text = text

    async def respond(self, messages, instruction=None, task=None, **sampling):
        return Reply(text=self.text, model=self.model)


def test_raw_data_counts(data_dir):
    dialogues = load_dialogues(data_dir)
    turns = [q for d in dialogues for q in d["questions"]]
    assert (len(dialogues), len(turns), sum(q["req_clari"] for q in turns)) == (277, 1982, 320)


def test_splits_by_dialogue_and_clarify_counts(data_dir):
    env = simkit.make("pacific")
    assert env.splits() == {"tune": 980, "eval": 1002}
    tune, ev = env.tasks("tune"), env.tasks("eval")
    assert Counter(t.gold_action for t in tune) == {ANSWER: 828, CLARIFY: 152}
    assert Counter(t.gold_action for t in ev) == {ANSWER: 834, CLARIFY: 168}
    d_tune, d_eval = {t.meta["dialogue"] for t in tune}, {t.meta["dialogue"] for t in ev}
    assert not d_tune & d_eval and (len(d_tune), len(d_eval)) == (138, 139)
    assert len({t.id for t in tune + ev}) == 1982
    # the split depends on the data only, not on file order
    dialogues = load_dialogues(data_dir)
    shuffled = list(dialogues)
    random.Random(1).shuffle(shuffled)
    assert split_of(shuffled) == split_of(dialogues)


def test_clarify_task_is_grounded_on_the_next_turn(data_dir):
    env = simkit.make("pacific")
    task = next(t for t in env.tasks("eval") if t.id == "pacific-e4fe0666-9c0e-43c0-9f67-538dae3092b9")
    assert task.gold_action == CLARIFY and task.reference == "Which year are you asking about?"
    assert task.user_reply == "2019" and task.goal == "$1,496.5 million"
    assert task.grounding["intent"] == "What is the amount of total sales in 2019?"
    assert task.meta["gold"]["scale"] == "million" and task.meta["gold"]["answer"] == ["$1,496.5"]
    first = task.prompt[0].content
    assert first.startswith("[context]\nSales by Contract Type") and "\n[data]\n" in first
    assert "Total sales : $1,496.5 | $1,202.9 | $1,107.7" in first
    assert first.endswith("\n\nWhat are the contract types?")
    assert [m.role for m in task.prompt] == ["user", "assistant"] * 3 + ["user"]
    assert task.prompt[1].content == "fixed-price type, cost-plus type, time-and-material type"
    assert task.prompt[3].content == "Which type of contract are you asking about?"
    assert task.prompt[-1].content == "What is the amount of total sales?"


def test_every_clarify_task_matches_the_dialogue_that_follows(data_dir):
    env = simkit.make("pacific")
    for split in ("tune", "eval"):
        tasks = env.tasks(split)
        for cur, nxt in zip(tasks, tasks[1:]):
            if cur.gold_action == CLARIFY:
                assert nxt.meta["dialogue"] == cur.meta["dialogue"] and nxt.gold_action == ANSWER
                assert nxt.prompt[-2].content == cur.reference and nxt.prompt[-1].content == cur.user_reply
                assert nxt.goal == cur.goal


def test_answer_rendering_keeps_the_scale_for_official_scoring(data_dir):
    assert answer_text(-12.6, "million") == "-12.6 million"
    assert answer_text(-22.22, "percent") == "-22.22%"
    assert answer_text(["73,260", "57,768"], "thousand") == "73,260 thousand, 57,768 thousand"
    assert answer_text(["cost-plus type"], "million") == "cost-plus type"
    env = simkit.make("pacific")
    numeric = [t for t in env.tasks("tune") + env.tasks("eval")
               if t.meta["gold"]["answer_type"] in ("arithmetic", "count")]
    assert len(numeric) == 880
    for t in numeric:  # the rendered goal text is right under UniPCQA's scale-applying scorer
        g = t.meta["gold"]
        assert official_em_f1(t.goal, g["answer"], g["scale"], g["answer_type"]) == (1.0, 1.0), t.id


async def test_episodes_end_to_end(data_dir):
    env = simkit.make("pacific")
    tasks = env.tasks("eval")[:50]
    assert 5 <= sum(t.gold_action == CLARIFY for t in tasks) < 50
    trajs = await simkit.collect(env, tasks, ReferenceThenGoal(), concurrency=16)
    assert len(trajs) == 50 and all(t.status == "ok" and t.terminated for t in trajs)
    assert all(t.first_action == t.gold_action for t in trajs)
    assert all(t.reward == 1.0 and t.turn_score_question_only == 1.0 for t in trajs)
    # the turn score of a CLARIFY turn compares with the gold continuation (question, reply, answer)
    assert all(t.turn_score == 1.0 for t in trajs if t.gold_action != CLARIFY)
    assert all(t.turn_score < 1.0 for t in trajs if t.gold_action == CLARIFY)
    by_id = {t.id: t for t in tasks}
    for traj in trajs:
        if traj.gold_action == CLARIFY:
            assert [t.role for t in traj.turns] == ["assistant", "user", "assistant"]
            assert traj.turns[1].text == by_id[traj.task_id].user_reply
    # the core's oracle policy reaches every goal too
    oracle = await simkit.collect(env, tasks, simkit.OraclePolicy(), concurrency=16)
    assert all(t.reward == 1.0 and env.success(t.reward) for t in oracle)
    # a content-free answer scores 0; clarifying forever is cut at the turn cap
    bad = await simkit.collect(env, tasks[:10], Fixed("I cannot tell from the report."))
    assert all(t.reward == 0.0 and not env.success(t.reward) for t in bad)
    loop = await simkit.collect(env, tasks[:10], Fixed("Which year do you mean?"))
    assert all(t.truncated and t.reward == 0.0 and len(t.assistant_turns) == env.max_turns for t in loop)


async def test_score_is_the_authors_metric_with_their_threshold(data_dir):
    env = simkit.make("pacific")
    task = env.tasks("eval")[0]
    assert env.success_threshold == 0.9
    assert await env.score("-12.6 million", "-12.6 million", task) == 1.0
    assert await env.score("-12.6", "-12.6 million", task) == 0.67  # below epsilon: not a success
    assert await env.score("-12,600,000", "-12.6 million", task) == 0.0
    scaled = simkit.make("pacific", scale_aware=True)
    assert await scaled.score("-12,600,000", "-12.6 million", task) == 1.0


def test_envs_command_lists_sizes(capsys, data_dir):
    from simkit.envserver.listing import run

    assert run(argparse.Namespace(data_dir=None)) == 0
    out = capsys.readouterr().out
    assert "pacific    tune=980, eval=1002" in out
    assert "abgcoqa    tune=560, eval=532" in out
