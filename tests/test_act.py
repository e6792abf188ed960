"""ACT Phase 1 / Phase 2 pair logic on the toy env (offline policies drive the episodes)."""
import json

import pytest

import simkit
from simkit import prompts
from simkit.act.contrast import phase1_pair, phase2_rollout
from simkit.roles.agents import RuleClassifier
from environments.toy.env import token_f1
from simkit.types import ANSWER, CLARIFY, Message, Reply, goal_text


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
    p = await phase1_pair(env, clarify_task, pol, version=3, contrast="forced")
    assert p.gold_action == CLARIFY and p.rejected_action == ANSWER
    assert "Answer the user's request directly" in pol.seen[-1]  # forced to take the rejected action
    assert p.chosen[0].content == clarify_task.reference and p.rejected[0].content == "whatever"
    assert p.prompt[0].role == "system" and p.prompt[1:] == clarify_task.prompt
    assert p.policy_version == 3 and p.adapter == "fixed" and p.phase == 1
    q = await phase1_pair(env, answer_task, pol, contrast="forced")
    assert q.rejected_action == CLARIFY and "clarifying question" in pol.seen[-1]
    assert (await phase1_pair(env, clarify_task, pol, version=3, contrast="forced")).id == p.id  # deterministic ids


async def test_phase2_outcomes(env):
    clarify_task, answer_task = env.tasks("train")[:2]
    base_c = await phase1_pair(env, clarify_task, FixedPolicy("It is 5 meters."), contrast="forced")
    base_a = await phase1_pair(env, answer_task, FixedPolicy("Which one?"), contrast="forced")

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


class ScriptedPolicy:
    """Replies from a script keyed by the instruction it is given (None = a plain turn)."""

    def __init__(self, by_instruction, default="It is 20 meters."):
        self.by, self.default, self.seen = by_instruction, default, []

    async def respond(self, messages, instruction=None, task=None, **kw):
        self.seen.append(instruction)
        for cue, text in self.by.items():
            if instruction and cue in instruction:
                return Reply(text=text, model="scripted")
        return Reply(text=self.default, model="scripted")


@pytest.mark.parametrize("name", ["toy", "ambigsql", "pacific", "abgcoqa"])
def test_clarify_reference_winner_is_the_gold_continuation(name):
    env = simkit.make(name) if name != "toy" else simkit.make("toy", size=4)
    task = next(t for t in env.tasks(next(iter(env.splits()))) if t.gold_action == CLARIFY)
    cont = task.gold_continuation()
    assert [m.role for m in cont] == ["assistant", "user", "assistant"]
    assert cont[0].content == task.reference and cont[1].content == task.user_reply
    assert cont[2].content == goal_text(task.goal) and cont[2].content
    answer = next(t for t in env.tasks(next(iter(env.splits()))) if t.gold_action == ANSWER)
    assert [m.content for m in answer.gold_continuation()] == [answer.reference]


async def test_clarify_pair_chosen_is_the_three_message_continuation(env):
    clarify_task = env.tasks("train")[0]
    p = await phase1_pair(env, clarify_task, FixedPolicy("It is 20 meters."), contrast="forced")
    assert [m.role for m in p.chosen] == ["assistant", "user", "assistant"]
    assert [m.content for m in p.chosen] == [clarify_task.reference, clarify_task.user_reply, clarify_task.goal]
    assert p.rejected == [Message(role="assistant", content="It is 20 meters.")]
    # Phase 2: a wrong action, or a failed trajectory, loses against the same continuation
    wrong = await phase2_rollout(env, p, clarify_task, FixedPolicy("It is 2 meters."))
    assert wrong.pair.source == "wrong-action" and wrong.pair.chosen == p.chosen
    failed = await phase2_rollout(env, p, clarify_task, FixedPolicy("Which one?"))
    assert failed.pair.source == "trajectory-failure" and failed.pair.chosen == p.chosen


async def test_turn_score_of_a_clarify_turn_compares_with_the_continuation(env):
    task = env.tasks("train")[0]
    ep = env.episode(task)
    await ep.step(task.reference)
    t = ep.trajectory()
    assert t.turn_score_question_only == 1.0  # the question alone matches
    assert 0 < t.turn_score < 1.0  # against question + reply + answer: partial
    assert t.turn_score == pytest.approx(token_f1(task.reference, task.gold_continuation_text()))


async def test_forced_losers_are_checked_retried_then_fall_back_and_counted(env, tmp_path):
    clarify_task, answer_task = env.tasks("train")[:2]
    # forced ANSWER obeys at once
    p = await phase1_pair(env, clarify_task, ScriptedPolicy({}, "It is 20 meters."), contrast="forced")
    assert p.meta["forced_path"] == "forced-ok" and p.meta["forced_attempts"] == 1
    # forced ANSWER asks anyway, obeys the strong few-shot instruction
    pol = ScriptedPolicy({"IMPORTANT": "It is 12 meters."}, "Which one do you mean?")
    p = await phase1_pair(env, clarify_task, pol, contrast="forced")
    assert p.meta["forced_path"] == "retried-ok" and p.rejected[0].content == "It is 12 meters."
    assert pol.seen == [prompts.load("policy/force_answer"), prompts.load("policy/force_answer_strong")]
    # forced ANSWER never answers: the gold answer (authors' fallback)
    p = await phase1_pair(env, clarify_task, ScriptedPolicy({}, "Which one do you mean?"), contrast="forced")
    assert p.meta["forced_path"] == "fallback" and p.meta["fallback"] == "gold-answer"
    assert p.rejected[0].content == clarify_task.goal and p.chosen[-1].content == clarify_task.goal
    # forced CLARIFY never asks: the reply cut at its '?' when it has one, else a template question
    p = await phase1_pair(env, answer_task, ScriptedPolicy({}, "Which tower? It is 300 meters."), contrast="forced")
    assert p.meta["forced_path"] == "fallback" and p.meta["fallback"] == "truncated"
    assert p.rejected[0].content == "Which tower?"
    p = await phase1_pair(env, answer_task, ScriptedPolicy({}, "It is 300 meters."), contrast="forced")
    assert p.meta["fallback"] == "template" and p.rejected[0].content == prompts.render("policy/fallback_clarify")
    assert RuleClassifier.classify_sync(p.rejected[0].content) == CLARIFY

    # build_pairs counts every path and drops pairs whose two sides are identical
    from simkit.act.pairs import build_pairs, new_phase1_stats, stats_path

    class Mixed:
        async def respond(self, messages, instruction=None, task=None, **kw):
            i = int(task.id.rsplit("-", 1)[1])
            if task.gold_action == ANSWER:  # forced CLARIFY: 1 -> obeys, 3 -> repeats the reference, 5 -> never
                text = {1: "Which one?", 3: task.reference}.get(i, "no")
                if i == 3 and instruction and "IMPORTANT" in instruction:
                    text = "Which one, really?"
                return Reply(text=text)
            if i % 4 == 0:  # forced ANSWER: obeys only when told strongly
                return Reply(text="20 meters" if instruction and "IMPORTANT" in instruction else "Which?")
            return Reply(text="20 meters")

    env8 = simkit.make("toy", size=8)
    stats = new_phase1_stats()
    out = env8.tasks("train")
    pairs, failures = await build_pairs(env8, out[:6], Mixed(), stats=stats, contrast="forced")
    assert failures == 0 and len(pairs) == 6
    paths = {p.task_id: p.meta["forced_path"] for p in pairs}
    assert paths == {"toy-train-0": "retried-ok", "toy-train-1": "forced-ok", "toy-train-2": "forced-ok",
                     "toy-train-3": "retried-ok", "toy-train-4": "retried-ok", "toy-train-5": "fallback"}
    assert (stats["forced_ok"], stats["retried_ok"], stats["fallback"], stats["identical_dropped"]) == (2, 3, 1, 0)

    class Parrot:  # forced CLARIFY on an ANSWER task that is itself a question: identical sides
        async def respond(self, messages, instruction=None, task=None, **kw):
            return Reply(text=task.reference)

    qtask = answer_task.model_copy(update={"reference": "Which one?", "id": "toy-q"})
    path = tmp_path / "pairs.jsonl"
    stats = new_phase1_stats()
    pairs, _ = await build_pairs(env, [qtask], Parrot(), out=path, stats=stats, contrast="forced")
    assert pairs == [] and stats["identical_dropped"] == 1 and stats["forced_ok"] == 1
    again = new_phase1_stats()
    pairs, _ = await build_pairs(env, [qtask], Parrot(), out=path, stats=again, contrast="forced")  # resume: not redone
    assert pairs == [] and again["identical_dropped"] == 1
    assert json.loads(stats_path(path).read_text())["dropped_task_ids"] == ["toy-q"]


async def test_random_actions_ablation_flips_winners():
    env = simkit.make("toy", size=40)
    tasks = env.tasks("train")
    pol = ScriptedPolicy({"clarifying question": "Which one do you mean?"}, "It is 20 meters.")
    from simkit.act.pairs import build_pairs, new_phase1_stats

    stats = new_phase1_stats()
    pairs, _ = await build_pairs(env, tasks, pol, random_actions=True, seed=3, stats=stats, contrast="forced")
    by_task = {t.id: t for t in tasks}
    flipped = [p for p in pairs if p.source == "random-flip"]
    kept = [p for p in pairs if p.source == "forced"]
    assert flipped and kept and stats["random_flips"] == len(flipped)
    for p in flipped:  # the random label wins: the reference is the loser
        t = by_task[p.task_id]
        assert p.gold_action != t.gold_action and p.rejected_action == t.gold_action
        assert p.rejected == t.gold_continuation() and p.chosen != t.gold_continuation()
        assert RuleClassifier.classify_sync(p.chosen[0].content) == p.gold_action
        assert p.meta["label_source"] == "random"
    for p in kept:
        assert p.gold_action == by_task[p.task_id].gold_action and p.chosen == by_task[p.task_id].gold_continuation()
    # the same seed gives the same labels; Phase 2 then judges samples against the random label
    again, _ = await build_pairs(env, tasks, pol, random_actions=True, seed=3, contrast="forced")
    assert [p.id for p in again] == [p.id for p in pairs] and [p.source for p in again] == [p.source for p in pairs]
    p = flipped[0]
    r = await phase2_rollout(env, p, by_task[p.task_id], simkit.OraclePolicy())  # the oracle takes the gold action
    assert r.pair.source == "wrong-action" and r.pair.chosen == p.chosen


async def test_irpo_pairs_best_success_against_worst_failure(env):
    from simkit.act.contrast import irpo_rollout

    clarify_task = env.tasks("train")[0]

    class Alternating:  # asks, then answers right on even calls and wrong on odd ones
        def __init__(self):
            self.n = 0

        async def respond(self, messages, instruction=None, task=None, **kw):
            if messages[-1].role == "user" and len(messages) == 2:
                return Reply(text="Which one do you mean?")
            self.n += 1
            return Reply(text=task.goal if self.n % 2 else "no idea")

    r = await irpo_rollout(env, clarify_task, Alternating(), version=2, samples=4)
    assert r.pair is not None and r.pair.source == "irpo" and r.pair.policy_version == 2
    assert r.pair.chosen[-1].content == clarify_task.goal and r.pair.rejected[-1].content == "no idea"
    assert r.pair.meta["successes"] == 2 and r.pair.meta["samples"] == 4
    same = await irpo_rollout(env, clarify_task, FixedPolicy("no idea"), samples=3)  # no contrast: no pair
    assert same.pair is None and same.dropped == "no-contrast"
