"""Abg-CoQA loader and end-to-end episodes on the real shared data (real embedder)."""
import random
from collections import Counter

import simkit
from environments.abgcoqa.loader import as_question, load_examples, pick_reading, split_of
from simkit.types import ANSWER, CLARIFY, Reply


class ReferenceThenGoal:
    model = "reference"

    async def respond(self, messages, instruction=None, task=None, **sampling):
        own = sum(m.role == "assistant" for m in messages) - sum(m.role == "assistant" for m in task.prompt)
        return Reply(text=task.reference if own == 0 else str(task.goal), model=self.model)


class OtherReading:
    """Clarifies, then answers the reading the user did *not* pick (a wrong final answer)."""

    model = "other-reading"

    async def respond(self, messages, instruction=None, task=None, **sampling):
        own = sum(m.role == "assistant" for m in messages) - sum(m.role == "assistant" for m in task.prompt)
        if own == 0:
            return Reply(text=task.reference, model=self.model)
        other = next(r["org_ans"] for r in task.meta["readings"] if r["org_ans"] != task.goal)
        return Reply(text=other, model=self.model)


def test_counts_and_story_split(data_dir):
    examples = load_examples(data_dir)
    assert len(examples) == 1092 and sum(e["ambiguity"] == "ambiguous" for e in examples) == 130
    env = simkit.make("abgcoqa")
    assert env.splits() == {"tune": 560, "eval": 532}
    tune, ev = env.tasks("tune"), env.tasks("eval")
    assert Counter(t.gold_action for t in tune) == {ANSWER: 488, CLARIFY: 72}
    assert Counter(t.gold_action for t in ev) == {ANSWER: 474, CLARIFY: 58}
    s_tune, s_eval = {t.meta["story"] for t in tune}, {t.meta["story"] for t in ev}
    assert not s_tune & s_eval and len(s_tune) == len(s_eval) == 250
    shuffled = list(examples)
    random.Random(2).shuffle(shuffled)
    assert split_of(shuffled) == split_of(examples)


def test_task_shapes(data_dir):
    env = simkit.make("abgcoqa")
    tasks = {t.id: t for t in env.tasks("tune") + env.tasks("eval")}
    amb = tasks["abgcoqa-3pxx5px6lxyuqm3uo2o1yddekb4ab3-9-2"]
    assert amb.gold_action == CLARIFY
    assert amb.reference == "Do you mean what did they remove before heading for the path?"
    assert (amb.user_reply, amb.goal) == ("Yes.", "Rope.")
    assert [m.role for m in amb.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert amb.prompt[0].content.startswith("Story:\nCHAPTER XXVIII.")
    assert amb.prompt[0].content.endswith("\n\nwhere did the path lead?")
    assert [m.content for m in amb.prompt[1:]] == ["dense thicket", "Which way was fastest?", "the shore",
                                                   "What did they remove?"]
    assert len(amb.meta["readings"]) == 2 and amb.meta["goal_alternatives"] == ["the dense brush- wood", "ropes"]
    plain = tasks["abgcoqa-369j354ofdapu1z2ebz3jj2p5ajg6o-7-2"]
    assert plain.gold_action == ANSWER and plain.reference == plain.goal == "yes"
    assert plain.prompt[-1].content == "did the driver try to pick more people up?"
    # every CLARIFY reference reads as a question, and no goal is an "Unknown" reading
    clar = [t for t in tasks.values() if t.gold_action == CLARIFY]
    assert all(t.reference.endswith("?") and t.goal.strip().lower().rstrip(".") != "unknown" for t in clar)
    assert as_question("What year") == "What year?" and as_question("At the end.") == "At the end?"
    assert pick_reading([{"org_ans": "Unknown."}, {"org_ans": "Rope"}]) == {"org_ans": "Rope"}


async def test_episodes_end_to_end(data_dir):
    env = simkit.make("abgcoqa")
    assert env.success_threshold == 0.5
    ev = env.tasks("eval")
    tasks = [t for t in ev if t.gold_action == CLARIFY][:25] + [t for t in ev if t.gold_action == ANSWER][:25]
    trajs = await simkit.collect(env, tasks, ReferenceThenGoal(), concurrency=50)
    assert len(trajs) == 50 and all(t.status == "ok" and t.terminated for t in trajs)
    assert all(t.first_action == t.gold_action for t in trajs)
    assert all(t.reward == 1.0 and t.turn_score_question_only == 1.0 and env.success(t.reward) for t in trajs)
    # a CLARIFY turn's turn score compares with the gold continuation (question, reply, answer)
    assert all(t.turn_score == 1.0 for t in trajs if t.gold_action != CLARIFY)
    oracle = await simkit.collect(env, tasks, simkit.OraclePolicy(), concurrency=50)
    assert all(t.reward == 1.0 for t in oracle)
    # answering the other reading after clarifying: a worse trajectory score on the same tasks
    two = [t for t in tasks if t.gold_action == CLARIFY and len(t.meta["readings"]) > 1]
    wrong = await simkit.collect(env, two, OtherReading(), concurrency=50)
    assert len(wrong) >= 15 and all(t.first_action == CLARIFY and t.reward < 1.0 for t in wrong)
    assert sum(t.reward for t in wrong) / len(wrong) < 0.5
    assert sum(env.success(t.reward) for t in wrong) <= len(wrong) // 3
