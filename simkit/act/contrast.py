"""ACT's data side: Phase 1 contrastive action pairs and Phase 2 on-policy trajectory pairs.

The authors' code is google-research/google-research, `learning_to_clarify/act/src/act/` (cited
below by its path from there).

Phase 1 (Algorithm 1): y_w = the reference winner, y_l = a response taking the other action. The
reference winner of a CLARIFY turn is the whole gold continuation (clarifying question, the user's
clarification, the gold answer; `Task.gold_continuation`), as data/base_dataset.py builds it; of
an ANSWER turn, the reference answer. The loser depends on `contrast`:

* `authors` (default, what their code builds): the loser of a CLARIFY turn is the gold answer
  (data/base_dataset.py: `rejected_response = gold_target`, a pure action contrast); the loser of
  an ANSWER turn is a clarifying question from a few-shot generator (`agents.LoserGenerator`:
  data/preference_generator.py, 10 shots, temperature 0.1, 64 tokens, cut at the first "?"),
  checked by the classifier in use, else the template question (`policy/fallback_clarify`).
* `forced` (the paper's wording): the policy *forced* to take the other action (`force_action`):
  the classifier labels it; a wrong action is asked again with a stronger few-shot instruction
  (`prompts/shared/policy/force_*_strong.txt`), then the authors' fallback — a forced ANSWER becomes the
  gold answer, a forced CLARIFY the reply cut at its first "?" or a template question.

One pair per user turn (`phase1_pairs`, `per_conversation="turn"`, default under `authors`): a
gold-CLARIFY task with a user reply and a gold answer also gives the turn after the clarification
(`turn1_task`: prompt + [gold question, user's reply], chosen = the gold answer, rejected = a
generated question), as data/base_dataset.py emits one instance per user turn. (Their loop appends
the user's reply to the prompt twice — once inside the CLARIFY turn's output, once as the next user
message; we build the dialogue once.) A pair whose two sides are identical teaches nothing and is
dropped (counted by the callers).

Every pair records its provenance: `chosen_action` / `rejected_action`, `contrast` ("action" when
the sides take different actions, "content" when the same), `chosen_source` / `rejected_source`
(`types.SIDE_SOURCES`) and `turn`.

Phase 2 (Algorithm 2): sample y_i from the current policy; with `replace_rule="paper"` a wrong
implicit action makes y_i the losing response; a right one is simulated to the end (user simulator
answers, policy continues, round cap) and scored by the env's heuristic against ε: a success
becomes y_w, a failure y_l. `replace_rule="authors"` decides by outcome alone (trainer/
act_trainer.py, see `phase2_rollout`). The sampled side is `on-policy`, its action the classifier's
label of the first reply. Ablations (docs/ACT.md, "Reference results") are one switch each:

* random-actions: a random label replaces the gold action. When it differs from the reference's
  action, the *random* action wins: chosen = a response taking it (`other_side`), rejected = the
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

from simkit import prompts
from simkit.roles.agents import ActionClassifier
from simkit.roles.client import RoleError
from simkit.engine import PolicyLike, play
from simkit.env import Env, Episode
from simkit.types import (ANSWER, CLARIFY, Message, PreferencePair, Task, Trajectory, contrast_of, goal_text,
                    opposite)

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
    name = "policy/force_clarify" if action == CLARIFY else "policy/force_answer"
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
    return Forced(prompts.render("policy/fallback_clarify", env=env.name), "fallback", len(texts), model, "template")


Contrast = Literal["authors", "forced"]
PairsPerConversation = Literal["turn", "one"]
ReplaceRule = Literal["paper", "authors"]
ContentPairs = Literal["keep", "base", "drop"]
_SIDE_OF_PATH = {"forced-ok": "forced", "retried-ok": "retried", "fallback": "fallback"}


def turn1_task(task: Task) -> Task | None:
    """The user turn after the clarification of a gold-CLARIFY task, as a task of its own: prompt =
    the task's prompt + [assistant: the gold clarifying question, user: the user's reply], gold
    action ANSWER, reference = the gold answer. None when the data has no reply or no answer.
    The authors make one instance per user turn (data/base_dataset.py, `build_prompt_dataset`:
    after a CLARIFY turn the loop reaches the user's reply and emits an ANSWER instance)."""
    answer = goal_text(task.goal)
    if task.gold_action != CLARIFY or not task.user_reply or not answer:
        return None
    prompt = [*task.prompt, Message(role="assistant", content=task.reference),
              Message(role="user", content=task.user_reply)]
    return Task(id=f"{task.id}#t1", env=task.env, prompt=prompt, reference=answer, gold_action=ANSWER,
                goal=task.goal, grounding=task.grounding,
                meta={**task.meta, "conversation": task.conversation_id, "base_task_id": task.id, "turn": 1})


def prompt_key(prompt: list[Message]) -> tuple:
    """A prompt as a hashable key (to spot a turn-1 task the env already has, as PACIFIC does)."""
    return tuple((m.role, m.content.strip()) for m in prompt)


@dataclass
class Side:
    """One non-reference side of a Phase 1 pair: its text, action, source (types.SIDE_SOURCES)."""

    text: str
    action: str
    source: str
    model: str = ""
    meta: dict[str, Any] | None = None


async def other_side(env: Env, task: Task, policy: Any, action: str, prompt: list[Message], *,
                     contrast: Contrast = "authors", classifier: ActionClassifier | None = None,
                     generator: Any = None, turn: int = 0) -> Side:
    """A response taking `action`. `authors`: ANSWER = the gold answer (data/base_dataset.py:
    `rejected_response = gold_target`), CLARIFY = the few-shot generator's question, checked by the
    classifier; when it gives no question (a 135M policy as its own generator mostly does not), a
    seeded reference question of another training turn (`LoserGenerator.pool_question`), else the
    template question. A single template loser on every ANSWER turn would only teach "never say
    that sentence", leaving "Which ...?" free on clear turns. `forced` (or no gold answer):
    `force_action`."""
    clf = classifier or env.classifier
    if contrast == "authors" and action == ANSWER and goal_text(task.goal):
        return Side(goal_text(task.goal), ANSWER, "reference", meta={"loser": "gold-answer"})
    if contrast == "authors" and action == CLARIFY:
        from simkit.roles.agents import LoserGenerator

        gen = generator or LoserGenerator(policy, env=env.name)
        reply = await gen.question(task, prompt, turn)
        if reply.text and await clf.classify(reply.text, task) == CLARIFY:
            return Side(reply.text, CLARIFY, "generator", reply.model, {"generator_path": "generator-ok"})
        pooled = gen.pool_question(task, turn)
        if pooled:  # another training turn's real clarifying question: varied wording, not one template
            return Side(pooled, CLARIFY, "fallback", reply.model,
                        {"generator_path": "fallback-pool", "generator_text": reply.text})
        return Side(prompts.render("policy/fallback_clarify", env=env.name), CLARIFY, "fallback", reply.model,
                    {"generator_path": "fallback", "generator_text": reply.text})
    forced = await force_action(env, task, policy, action, prompt, classifier)
    return Side(forced.text, action, _SIDE_OF_PATH[forced.path], forced.model,
                {"forced_action": action, "forced_path": forced.path, "forced_attempts": forced.attempts,
                 "fallback": forced.fallback})


async def phase1_pair(env: Env, task: Task, policy: Any, *, annotator: ActionClassifier | None = None,
                      rng: random.Random | None = None, version: int = 0,
                      classifier: ActionClassifier | None = None, contrast: Contrast = "authors",
                      generator: Any = None, turn: int | None = None) -> PreferencePair:
    """One D_pref entry: the reference winner over a response taking the other action (`other_side`;
    with `rng`, the random-actions ablation: a flipped label makes that response win)."""
    turn = int("base_task_id" in task.meta) if turn is None else turn
    ref_action = await gold_action(task, annotator)
    action = await gold_action(task, rng=rng) if rng is not None else ref_action
    prompt = env.episode(task).messages
    reference = task.gold_continuation()
    flip = action != ref_action
    side = await other_side(env, task, policy, action if flip else opposite(action), prompt, contrast=contrast,
                            classifier=classifier, generator=generator, turn=turn)
    if not flip:
        chosen, rejected, source = reference, _assistant(side.text), contrast
        sides = (ref_action, "reference", side.action, side.source)
    else:  # random label differs from the reference's action: the random action wins
        chosen, rejected, source = _assistant(side.text), reference, "random-flip"
        sides = (side.action, side.source, ref_action, "reference")
    return PreferencePair(
        id=stable_id("p1", env.name, task.id, version), prompt=prompt, chosen=chosen, rejected=rejected,
        gold_action=action, rejected_action=sides[2], policy_version=version, adapter=side.model,
        env=env.name, task_id=task.id, phase=1, source=source, chosen_action=sides[0],
        chosen_source=sides[1], rejected_source=sides[3], contrast=contrast_of(sides[0], sides[2]), turn=turn,
        meta={"label_source": "random" if rng else ("annotator" if annotator else "data"),
              "reference_action": ref_action, "data_action": task.gold_action, "contrast_mode": contrast,
              "base_task_id": task.meta.get("base_task_id", task.id), **(side.meta or {})},
    )


@dataclass
class TurnIndex:
    """The prompts of a task pool: which turns the env already has as tasks, and which of them
    come right after a gold clarification (PACIFIC has one task per user turn; toy, AmbigSQL and
    Abg-CoQA have one per conversation)."""

    prompts: set
    after_clarify: set

    @classmethod
    def of(cls, tasks: list[Task]) -> "TurnIndex":
        t1s = [t1 for t in tasks if (t1 := turn1_task(t)) is not None]
        return cls({prompt_key(t.prompt) for t in tasks}, {prompt_key(t.prompt) for t in t1s})


async def phase1_pairs(env: Env, task: Task, policy: Any, *, per_conversation: PairsPerConversation | None = None,
                       index: TurnIndex | None = None, **kw: Any) -> list[PreferencePair]:
    """The D_pref entries of one task: its own pair and, with `per_conversation="turn"` (default
    under the authors' contrast), the pair of the turn after the clarification (`turn1_task`)
    unless `index` shows the env already has that turn as a task (PACIFIC: then that task's own
    pair is marked turn 1)."""
    per = per_conversation or ("turn" if kw.get("contrast", "authors") == "authors" else "one")
    after = index is not None and prompt_key(task.prompt) in index.after_clarify
    pairs = [await phase1_pair(env, task, policy, turn=int(after), **kw)]
    t1 = turn1_task(task) if per == "turn" else None
    if t1 is not None and (index is None or prompt_key(t1.prompt) not in index.prompts):
        pairs.append(await phase1_pair(env, t1, policy, turn=1, **kw))
    return pairs


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


def base_side(base: PreferencePair, which: str) -> tuple[str | None, str]:
    """(action, source) of one side of a D_pref pair, derived for pairs written before the
    provenance fields (a Phase 1 winner takes the gold action; the forced side is the other)."""
    flip = base.source == "random-flip"
    if which == "chosen":
        return base.chosen_action or base.gold_action, base.chosen_source or ("forced" if flip else "reference")
    return base.rejected_action, base.rejected_source or ("reference" if flip else "forced")


def _same(a: list[Message], b: list[Message]) -> bool:
    """act_trainer.py post_process_features' test: equal after lower-casing and joining whitespace."""
    def norm(ms: list[Message]) -> str:
        return " ".join(" ".join(m.content for m in ms).lower().split())
    return norm(a) == norm(b)


async def phase2_rollout(env: Env, base: PreferencePair, task: Task, policy: PolicyLike, *, version: int = 0,
                         epoch: int = 0, simulate: bool = True, replace_rule: ReplaceRule = "paper",
                         content_pairs: ContentPairs = "keep") -> Rollout:
    """Refresh one D_pref pair with the current policy (ACT Algorithm 2, one turn).

    The engine's episode loop plays it; it stops right after the first reply when that reply is
    judged by its action alone (a wrong action, or no simulation), so the simulator is asked
    only when its answer is used — as the authors' simulator.py `should_simulate` (only a
    clarifying question of a gold-CLARIFY turn is simulated). The pair's version is the oldest
    one stamped on its turns.

    `replace_rule="paper"`: Algorithm 2 — a wrong action always loses, a right one is judged by
    the simulated outcome (`_paper_sides`). `"authors"`: trainer/act_trainer.py
    `concatenated_forward` (l.199-210 at commit 4c42994) — the outcome alone (`_authors_sides`);
    the final answer of an unsimulated reply is the reply itself (simulator.py
    `generate_trajectory`).

    `content_pairs`: what becomes of a pair whose sides take the same action (it contrasts only the
    content, e.g. the gold SQL against the sample's wrong SQL): "keep" it (both rules above),
    replace it by its base D_pref pair, an action contrast ("base", source "content-to-base"), or
    "drop" it (dropped "content-only"). An ablation of the pair mix, not in the paper."""
    ep = env.episode(task)

    def judged_by_action(e: Episode) -> bool:
        return not simulate or e.first_action != base.gold_action

    try:
        await play(ep, policy, until=judged_by_action)
    except Exception as e:  # a role gave up, or an env hook (classify, score, simulate) raised
        return _failed(_stamp(ep.trajectory(), version), e)

    right = ep.first_action == base.gold_action
    traj = _stamp(ep.trajectory(), version)
    sample_side = (ep.first_action, "on-policy")
    if replace_rule == "authors":
        try:
            score = ep.reward if ep.terminated else await env.score(traj.final_answer or "", task.goal, task)
        except Exception as e:  # an env hook raised: a counted failure
            return _failed(traj, e)
        success = env.success(score)
        chosen, rejected, source, sides = _authors_sides(base, traj.continuation(), sample_side, success)
        traj.info.update(outcome_score=score)
    else:
        success = bool(ep.terminated and env.success(ep.reward))
        chosen, rejected, source, sides = _paper_sides(base, traj.continuation(), sample_side, right=right,
                                                       simulate=simulate, success=success)
    traj.info.update(right_action=right, source=source, success=success)
    pair = _phase2_pair(env, base, task, traj, (chosen, rejected, source, sides), terminated=ep.terminated,
                        epoch=epoch, replace_rule=replace_rule)
    if pair.contrast == "content" and content_pairs == "drop":
        return _drop(traj, "content-only")
    if pair.contrast == "content" and content_pairs == "base":
        pair = _as_base(pair, base)
    if identical_sides(pair):
        return _drop(traj)
    return Rollout(traj, pair)


def _as_base(pair: PreferencePair, base: PreferencePair) -> PreferencePair:
    """The Phase 2 pair with the base pair's sides (and their provenance) in place of its own;
    its id, version and adapter stay the sample's, so it is trained once per refresh as any other."""
    (chosen_action, chosen_source), (rejected_action, rejected_source) = base_side(base, "chosen"), \
        base_side(base, "rejected")
    return pair.model_copy(update=dict(
        chosen=base.chosen, rejected=base.rejected, source="content-to-base", chosen_action=chosen_action,
        rejected_action=rejected_action, chosen_source=chosen_source, rejected_source=rejected_source,
        contrast=contrast_of(chosen_action, rejected_action), meta={**pair.meta, "replaced_source": pair.source}))


_Side = tuple[str | None, str]  # (action, source) of one side of a pair
_Sides = tuple[list[Message], list[Message], str, tuple[_Side, _Side]]  # chosen, rejected, source, their sides


def _phase2_pair(env: Env, base: PreferencePair, task: Task, traj: Trajectory, picked: _Sides, *,
                 terminated: bool, epoch: int, replace_rule: ReplaceRule) -> PreferencePair:
    """The Phase 2 pair with its provenance: the base pair's prompt, gold action and turn, the
    sample's version and adapter, its score when the episode ended."""
    chosen, rejected, source, ((chosen_action, chosen_source), (rejected_action, rejected_source)) = picked
    return PreferencePair(
        id=stable_id("p2", env.name, task.id, epoch), prompt=base.prompt, chosen=chosen, rejected=rejected,
        gold_action=base.gold_action, rejected_action=rejected_action, policy_version=traj.policy_version,
        adapter=traj.turns[0].model if traj.turns else "", env=env.name, task_id=task.id, phase=2,
        source=source, score=traj.reward if terminated else None,
        chosen_action=chosen_action, chosen_source=chosen_source, rejected_source=rejected_source,
        contrast=contrast_of(chosen_action, rejected_action), turn=base.turn,
        meta={"epoch": epoch, "replace_rule": replace_rule,
              "base_task_id": base.meta.get("base_task_id", base.task_id)},
    )


def _paper_sides(base: PreferencePair, sampled: list[Message], sample_side: _Side, *, right: bool,
                 simulate: bool, success: bool) -> _Sides:
    """Algorithm 2: a wrong action loses (its first reply against the base chosen); with no
    simulation a right action wins by its first reply; else the simulated outcome decides."""
    if not right:
        return base.chosen, sampled[:1], "wrong-action", (base_side(base, "chosen"), sample_side)
    if not simulate:
        return sampled[:1], base.rejected, "right-action", (sample_side, base_side(base, "rejected"))
    if success:
        return sampled, base.rejected, "trajectory-success", (sample_side, base_side(base, "rejected"))
    return base.chosen, sampled, "trajectory-failure", (base_side(base, "chosen"), sample_side)


def _authors_sides(base: PreferencePair, sampled: list[Message], sample_side: _Side, success: bool) -> _Sides:
    """The authors' rule, by outcome alone, whatever the sample's action: `conditon_checker`
    (pacific_metrics.py: DROP F1 of the final answer vs the gold target below the threshold) makes
    the sample the rejected side against the base chosen, else the chosen side against the base
    rejected. A sample equal to the side it faces (case and whitespace aside) gives back the base
    pair (`post_process_features`, l.132-168), whose sides are never equal (Phase 1 drops those, so
    their "Could you clarify ...?" last resort is never needed)."""
    if success:
        chosen, rejected, source = sampled, base.rejected, "outcome-success"
        sides = (sample_side, base_side(base, "rejected"))
    else:
        chosen, rejected, source = base.chosen, sampled, "outcome-failure"
        sides = (base_side(base, "chosen"), sample_side)
    if _same(chosen, rejected):
        chosen, rejected, source = base.chosen, base.rejected, "outcome-reverted"
        sides = (base_side(base, "chosen"), base_side(base, "rejected"))
    return chosen, rejected, source, sides


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
        rejected_action=worst.first_action, policy_version=version,
        adapter=best.turns[0].model if best.turns else "", env=env.name, task_id=task.id, phase=2, source="irpo",
        score=best.reward, chosen_action=best.first_action, chosen_source="on-policy", rejected_source="on-policy",
        contrast=contrast_of(best.first_action, worst.first_action), turn=int("base_task_id" in task.meta),
        meta={"epoch": epoch, "samples": len(trajs), "successes": len(ok)})
    if identical_sides(pair):
        return _drop(best)
    return Rollout(best, pair)
