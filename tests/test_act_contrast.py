"""Issue 20: the authors' action contrast, one pair per user turn, the loser generator over a real
loopback server, Phase 2 replacement rules, rollout sampling, and every path's provenance."""
import contextlib
import json

import pytest
from aiohttp import web

import simkit
from simkit import prompts
from simkit.act.contrast import TurnIndex, irpo_rollout, phase1_pair, phase1_pairs, phase2_rollout, turn1_task
from simkit.roles.agents import CutFirstNewline, LoserGenerator
from simkit.act.pairs import build_pairs, new_phase1_stats, read_pairs
from simkit.roles.build import RolesConfig, build_loser_generator, build_roles, set_rollout_sampling
from simkit.loadtools.testing import free_port
from simkit.types import ANSWER, CLARIFY, Message, PreferencePair, Reply


class Scripted:
    """Replies keyed by a cue of the instruction or of the last message (None: plain turn)."""

    def __init__(self, by=None, default="It is 20 meters."):
        self.by, self.default, self.seen = by or {}, default, []

    async def respond(self, messages, instruction=None, task=None, **kw):
        self.seen.append((instruction, kw))
        text = (instruction or "") + messages[-1].content
        for cue, reply in self.by.items():
            if cue in text:
                return Reply(text=reply, model="scripted")
        return Reply(text=self.default, model="scripted")


@pytest.fixture
def env():
    return simkit.make("toy", size=24)


def _tasks(env):
    tasks = env.tasks("train")
    return next(t for t in tasks if t.gold_action == CLARIFY), next(t for t in tasks if t.gold_action == ANSWER)


@contextlib.asynccontextmanager
async def stub_server(reply_for):
    """A real OpenAI-compatible loopback server: records each request body, answers reply_for(body)."""
    seen = []

    async def chat(request):
        body = await request.json()
        seen.append(body)
        return web.json_response({"id": "x", "object": "chat.completion", "model": body.get("model") or "stub",
                                  "choices": [{"index": 0, "finish_reason": "stop",
                                               "message": {"role": "assistant", "content": reply_for(body)}}],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    async def models(request):
        return web.json_response({"data": [{"id": "stub"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1", seen
    finally:
        await runner.cleanup()


def _provenance(p):
    return (p.chosen_action, p.rejected_action, p.contrast, p.chosen_source, p.rejected_source, p.turn)


async def test_authors_contrast_clarify_turn_loses_to_the_gold_answer(env):
    clarify, _ = _tasks(env)
    pol = Scripted()
    p = await phase1_pair(env, clarify, pol)  # default: authors
    assert p.rejected == [Message(role="assistant", content=clarify.goal)] and p.chosen == clarify.gold_continuation()
    assert _provenance(p) == (CLARIFY, ANSWER, "action", "reference", "reference", 0)
    assert pol.seen == [] and p.source == "authors" and p.meta["loser"] == "gold-answer"
    f = await phase1_pair(env, clarify, pol, contrast="forced")  # today's behaviour, kept
    assert f.rejected[0].content == "It is 20 meters." and _provenance(f) == (CLARIFY, ANSWER, "action", "reference",
                                                                             "forced", 0)


async def test_authors_answer_turn_loser_from_the_generator_or_the_template(env):
    _, answer = _tasks(env)
    gen = LoserGenerator(Scripted(default="Which tower do you mean? Or the oak?\nmore"), env.tasks("train"),
                         env="toy")
    p = await phase1_pair(env, answer, Scripted(), generator=gen)
    assert p.rejected[0].content == "Which tower do you mean?" and p.meta["generator_path"] == "generator-ok"
    assert _provenance(p) == (ANSWER, CLARIFY, "action", "reference", "generator", 0)
    bad = LoserGenerator(Scripted(default="It is 300 meters."), env.tasks("train"), env="toy")
    q = await phase1_pair(env, answer, Scripted(), generator=bad)  # no question: another turn's reference question
    pool_questions = {t.reference.strip() for t in bad.pool if t.conversation_id != answer.conversation_id}
    assert q.rejected[0].content in pool_questions and q.meta["generator_path"] == "fallback-pool"
    assert q.rejected_source == "fallback" and q.meta["generator_text"] == ""
    empty = LoserGenerator(Scripted(default="It is 300 meters."), [], env="toy")  # no pool: the template
    r = await phase1_pair(env, answer, Scripted(), generator=empty)
    assert r.rejected[0].content == prompts.render("policy/fallback_clarify", env="toy")
    assert r.meta["generator_path"] == "fallback" and r.rejected_source == "fallback"


async def test_forced_paths_record_their_sources(env):
    clarify, answer = _tasks(env)
    retried = Scripted({"IMPORTANT": "It is 12 meters."}, "Which one do you mean?")
    assert (await phase1_pair(env, clarify, retried, contrast="forced")).rejected_source == "retried"
    fb = await phase1_pair(env, clarify, Scripted(default="Which one?"), contrast="forced")
    assert fb.rejected_source == "fallback" and fb.rejected_action == ANSWER and fb.contrast == "action"
    ok = await phase1_pair(env, answer, Scripted(default="Which one?"), contrast="forced")
    assert _provenance(ok) == (ANSWER, CLARIFY, "action", "reference", "forced", 0)


async def test_random_flip_provenance_under_both_contrasts():
    env = simkit.make("toy", size=40)
    pol = Scripted({"clarifying question": "Which one do you mean?"})
    for contrast in ("authors", "forced"):
        pairs, _ = await build_pairs(env, env.tasks("train"), pol, random_actions=True, seed=3, contrast=contrast,
                                     per_conversation="one")
        flips = [p for p in pairs if p.source == "random-flip"]
        assert flips
        for p in flips:
            assert p.rejected_source == "reference" and p.rejected_action != p.chosen_action == p.gold_action
            assert p.chosen_source in {"forced", "retried", "fallback", "generator", "reference"}


async def test_one_pair_per_user_turn(env):
    clarify, answer = _tasks(env)
    gen = LoserGenerator(Scripted(default="Which one do you mean?"), env.tasks("train"), env="toy")
    pairs = await phase1_pairs(env, clarify, Scripted(), generator=gen)
    assert [p.turn for p in pairs] == [0, 1] and len({p.id for p in pairs}) == 2
    t1 = pairs[1]
    assert t1.prompt == [*pairs[0].prompt, Message(role="assistant", content=clarify.reference),
                         Message(role="user", content=clarify.user_reply)]
    assert t1.chosen == [Message(role="assistant", content=clarify.goal)]
    assert _provenance(t1) == (ANSWER, CLARIFY, "action", "reference", "generator", 1)
    assert t1.task_id == clarify.id + "#t1" and t1.meta["base_task_id"] == clarify.id
    again = await phase1_pairs(env, clarify, Scripted(), generator=gen)
    assert [p.id for p in again] == [p.id for p in pairs]  # deterministic
    assert len(await phase1_pairs(env, clarify, Scripted(), generator=gen, per_conversation="one")) == 1
    assert len(await phase1_pairs(env, answer, Scripted(), generator=gen)) == 1
    # an env that already has the turn after the clarification as a task (PACIFIC): no second pair,
    # and that task's own pair is marked turn 1
    nxt = turn1_task(clarify).model_copy(update={"id": "next-turn", "meta": {}})
    index = TurnIndex.of([clarify, nxt])
    assert [p.turn for p in await phase1_pairs(env, clarify, Scripted(), generator=gen, index=index)] == [0]
    assert [p.turn for p in await phase1_pairs(env, nxt, Scripted(), generator=gen, index=index)] == [1]


async def test_loser_generator_over_a_loopback_server_is_prompted_and_counted(env, tmp_path):
    tasks = env.tasks("train")[:12]

    def reply(body):
        prompt = body["messages"][-1]["content"]
        return "The answer is 20 meters." if "How tall is the" in prompt.split("\n\n")[-1] else \
            "Do you mean the first one? Also this.\nUser: x"

    async with stub_server(reply) as (url, seen):
        cfg = RolesConfig.model_validate({"policy": {"url": [url]}})
        roles = build_roles(cfg, "toy")
        gen = build_loser_generator(roles, cfg, url, "gen-model", tasks, "toy", seed=1)
        try:
            stats = new_phase1_stats()
            out = tmp_path / "pairs.jsonl"
            pairs, failures = await build_pairs(env, tasks, roles.policy, out=out, generator=gen, stats=stats,
                                                classifier=env.classifier)
        finally:
            await roles.aclose()
    assert failures == 0 and len(pairs) == 12 + 6  # 6 CLARIFY tasks give a turn-1 pair each
    gen_calls = [b for b in seen if b.get("model") == "gen-model"]
    assert len(gen_calls) == 12  # 6 ANSWER turns + 6 turn-1 pairs; CLARIFY losers are the gold answers
    assert all(b["temperature"] == 0.1 and b["max_tokens"] == 64 for b in gen_calls)
    # 6 gold-CLARIFY tasks in the pool: an ANSWER turn gets all 6 as shots, a turn-1 pair the 5 others (+ the task)
    shots = sorted({b["messages"][0]["content"].count("should ask a clarifying question") for b in gen_calls})
    assert shots == [6, 7]
    assert stats["generator_ok"] == 6 and stats["generator_fallback"] == 6 and stats["reference_loser"] == 6
    assert stats["turn1_pairs"] == 6 and stats["contrast_action"] == 18
    t1 = [p for p in pairs if p.turn == 1]
    assert all(p.rejected[0].content == "Do you mean the first one?" for p in t1)
    assert {p.rejected_source for p in pairs if p.gold_action == ANSWER and p.turn == 0} == {"fallback"}
    # resume: every task is in the file (both turns), nothing is redone
    again, _ = await build_pairs(env, tasks, Scripted(), out=out, generator=gen)
    assert again == [] and len(read_pairs(out)) == 18


async def test_phase2_paths_record_contrast_and_sources(env):
    clarify, answer = _tasks(env)
    base_c = await phase1_pair(env, clarify, Scripted())  # authors: gold continuation vs gold answer
    gen = LoserGenerator(Scripted(default="Which one?"), env.tasks("train"), env="toy")
    base_a = await phase1_pair(env, answer, Scripted(), generator=gen)

    r = await phase2_rollout(env, base_c, clarify, simkit.OraclePolicy())
    assert r.pair.source == "trajectory-success"
    assert _provenance(r.pair) == (CLARIFY, ANSWER, "action", "on-policy", "reference", 0)
    r = await phase2_rollout(env, base_c, clarify, Scripted(default="It is 7 meters."))
    assert r.pair.source == "wrong-action"
    assert _provenance(r.pair) == (CLARIFY, ANSWER, "action", "reference", "on-policy", 0)
    r = await phase2_rollout(env, base_a, answer, Scripted(default="no idea"))
    assert r.pair.source == "trajectory-failure"
    assert _provenance(r.pair) == (ANSWER, ANSWER, "content", "reference", "on-policy", 0)
    r = await phase2_rollout(env, base_c, clarify, simkit.OraclePolicy(), simulate=False)
    assert r.pair.source == "right-action"
    assert _provenance(r.pair) == (CLARIFY, ANSWER, "action", "on-policy", "reference", 0)
    r = await phase2_rollout(env, base_a, answer, simkit.OraclePolicy())
    assert r.pair.source == "trajectory-success"
    assert _provenance(r.pair) == (ANSWER, CLARIFY, "action", "on-policy", "generator", 0)
    # a turn-1 pair is refreshed on its own turn
    t1 = turn1_task(clarify)
    base_t1 = await phase1_pair(env, t1, Scripted(), generator=gen)
    r = await phase2_rollout(env, base_t1, t1, simkit.OraclePolicy(), epoch=2)
    assert r.pair.prompt == base_t1.prompt and r.pair.turn == 1 and r.pair.chosen[0].content == clarify.goal
    assert r.pair.id != (await phase2_rollout(env, base_c, clarify, simkit.OraclePolicy(), epoch=2)).pair.id


async def test_authors_replace_rule_decides_by_outcome_alone(env):
    clarify, answer = _tasks(env)
    base_c = await phase1_pair(env, clarify, Scripted())
    gen = LoserGenerator(Scripted(default="Which one?"), env.tasks("train"), env="toy")
    base_a = await phase1_pair(env, answer, Scripted(), generator=gen)
    # a wrong action (answers a CLARIFY turn) whose answer reaches the goal wins under the authors' rule
    guess = Scripted(default=f"It is {clarify.goal}.")
    paper = await phase2_rollout(env, base_c, clarify, guess)
    authors = await phase2_rollout(env, base_c, clarify, guess, replace_rule="authors")
    assert paper.pair.source == "wrong-action" and authors.pair.source == "outcome-success"
    assert authors.pair.chosen[0].content == guess.default and authors.pair.rejected == base_c.rejected
    assert _provenance(authors.pair) == (ANSWER, ANSWER, "content", "on-policy", "reference", 0)
    assert authors.trajectory.info["right_action"] is False and authors.trajectory.info["success"] is True
    # a question on an ANSWER turn is not simulated; its own text is the final answer: a failure
    asks = await phase2_rollout(env, base_a, answer, Scripted(default="Which one do you mean?"), replace_rule="authors")
    assert asks.pair.source == "outcome-failure" and asks.pair.rejected[0].content == "Which one do you mean?"
    assert _provenance(asks.pair) == (ANSWER, CLARIFY, "action", "reference", "on-policy", 0)
    # the right action, simulated, failing: loses against the base chosen
    fails = await phase2_rollout(env, base_c, clarify, Scripted({"I mean": "no idea"}, "Which one do you mean?"),
                                 replace_rule="authors")
    assert fails.pair.source == "outcome-failure" and len(fails.pair.rejected) == 3
    # a sample equal to the side it faces gives back the base pair (post_process_features): here the
    # gold answer given straight away on a CLARIFY turn succeeds, against the gold answer itself
    same = await phase2_rollout(env, base_c, clarify, Scripted(default=f" {clarify.goal.upper()} "),
                                replace_rule="authors")
    assert same.pair.source == "outcome-reverted" and same.pair.chosen == base_c.chosen
    assert same.pair.rejected == base_c.rejected and same.pair.contrast == "action"
    assert (same.pair.chosen_source, same.pair.rejected_source) == ("reference", "reference")


async def test_irpo_pairs_record_on_policy_sides(env):
    clarify, _ = _tasks(env)

    class Alternating:
        def __init__(self):
            self.n = 0

        async def respond(self, messages, instruction=None, task=None, **kw):
            if len(messages) > 2:  # after the user's clarification: the goal
                return Reply(text=task.goal)
            self.n += 1  # first turns alternate: ask (then succeed) / a wrong answer
            return Reply(text="Which one do you mean?" if self.n % 2 else "no idea")

    r = await irpo_rollout(env, clarify, Alternating(), samples=4)
    assert r.pair is not None and (r.pair.chosen_source, r.pair.rejected_source) == ("on-policy", "on-policy")
    assert r.pair.chosen_action == CLARIFY and r.pair.rejected_action == ANSWER and r.pair.contrast == "action"


async def test_cut_first_newline_and_rollout_sampling_defaults(env):
    clarify, _ = _tasks(env)
    cut = CutFirstNewline(Scripted(default="  It is 20 meters.\nUser: thanks\nAssistant: ok"))
    assert (await cut.respond([Message(role="user", content="q")])).text == "It is 20 meters."
    assert cut.default.startswith("  It is")  # everything else is the wrapped policy's

    async with stub_server(lambda body: "It is 20 meters.\nmore") as (url, seen):
        cfg = RolesConfig.model_validate({"policy": {"url": [url]}})
        roles = build_roles(cfg, "toy")
        try:
            base = await phase1_pair(env, clarify, Scripted())
            set_rollout_sampling(roles, None)  # serve's default: the checkpoint's generation config
            r = await phase2_rollout(env, base, clarify, CutFirstNewline(roles.policy))
            assert "temperature" not in seen[-1] and "top_p" not in seen[-1] and seen[-1]["max_tokens"] == 256
            assert r.trajectory.turns[0].text == "It is 20 meters."
            set_rollout_sampling(roles, 0.7)  # --rollout-temperature 0.7: today's explicit value
            await phase2_rollout(env, base, clarify, roles.policy)
            assert seen[-1]["temperature"] == 0.7
        finally:
            await roles.aclose()


def test_old_pairs_without_provenance_still_load_and_derive_their_kind():
    old = {"id": "x", "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
           "rejected": [{"role": "assistant", "content": "b?"}], "gold_action": "ANSWER", "rejected_action": "CLARIFY",
           "policy_version": 0, "phase": 1, "source": "forced", "meta": {}}
    p = PreferencePair.model_validate_json(json.dumps(old))
    assert (p.chosen_action, p.contrast, p.chosen_source, p.turn) == (None, None, "", 0) and p.kind == "action"
    p2 = PreferencePair.model_validate({**old, "phase": 2, "rejected_action": None})
    assert p2.kind == "unknown"


async def test_serve_wires_the_options_and_reports_the_mix(tmp_path):
    import argparse
    import asyncio

    from simkit.queue import open_queue
    from simkit.serving.serve import ServeConfig, serve

    async with stub_server(lambda body: "Which one do you mean?\nAssistant: more") as (url, seen):
        cfg = ServeConfig(env="toy", queue=str(tmp_path / "q.db"), run_dir=str(tmp_path / "run"), n_conversations=6,
                          max_epochs=1, poll_s=0.05, concurrency=4, replace_rule="authors", cut_first_newline=True,
                          save_trajectories=True)
        summary = await asyncio.wait_for(serve(cfg, argparse.Namespace(policy=url, max_tokens=8)), 60)
    assert summary["episodes"] == 9  # 6 tasks, 3 of them gold-CLARIFY: 3 turn-1 pairs
    assert summary["pairs_action"] + summary["pairs_content"] == summary["pairs"] > 0
    assert summary["pairs_action_clarify"] + summary["pairs_action_answer"] == summary["pairs_action"]
    rollouts = [b for b in seen if b.get("max_tokens") == 8]
    assert rollouts and all("temperature" not in b for b in rollouts)  # the checkpoint's generation config
    assert any(b.get("temperature") == 0.1 for b in seen)  # the loser generator (default: the policy's server)
    trajs = [json.loads(line) for line in (tmp_path / "run" / "trajectories.jsonl").read_text().splitlines()]
    assert all("\n" not in t["text"] for tr in trajs for t in tr["turns"] if t["role"] == "assistant")
    with open_queue(str(tmp_path / "q.db")) as q:
        pairs = q.lease(100, consumer="check").pairs
    assert {p.turn for p in pairs} == {0, 1} and all(p.source.startswith("outcome-") for p in pairs)
    assert all(p.chosen_source and p.rejected_source and p.contrast for p in pairs)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["pairs_action"] == summary["pairs_action"]


async def test_content_pairs_keep_base_or_drop(env):
    """--content-pairs: a same-action pair (the gold answer vs a wrong one) is kept, replaced by its
    D_pref action pair with that pair's provenance, or dropped; action pairs pass unchanged."""
    clarify, answer = _tasks(env)
    gen = LoserGenerator(Scripted(default="Which one?"), env.tasks("train"), env="toy")
    base_a = await phase1_pair(env, answer, Scripted(), generator=gen)
    wrong = Scripted(default="no idea")
    kept = await phase2_rollout(env, base_a, answer, wrong)
    assert kept.pair.contrast == "content" and kept.pair.source == "trajectory-failure"
    based = await phase2_rollout(env, base_a, answer, wrong, content_pairs="base")
    assert based.pair.source == "content-to-base" and based.pair.meta["replaced_source"] == "trajectory-failure"
    assert (based.pair.chosen, based.pair.rejected) == (base_a.chosen, base_a.rejected)
    assert _provenance(based.pair) == (ANSWER, CLARIFY, "action", "reference", "generator", 0)
    assert based.pair.id == kept.pair.id and based.pair.phase == 2
    dropped = await phase2_rollout(env, base_a, answer, wrong, content_pairs="drop")
    assert dropped.pair is None and dropped.dropped == "content-only"
    # an action pair (a wrong action) is the same under every setting
    base_c = await phase1_pair(env, clarify, Scripted())
    guess = Scripted(default="It is 7 meters.")
    for mode in ("keep", "base", "drop"):
        r = await phase2_rollout(env, base_c, clarify, guess, content_pairs=mode)
        assert r.pair.source == "wrong-action" and r.pair.contrast == "action"


async def test_serve_drops_content_pairs_and_counts_them(tmp_path):
    import argparse
    import asyncio

    from simkit.queue import open_queue
    from simkit.serving.serve import ServeConfig, serve

    # a policy that always asks: on a gold-CLARIFY turn it asks again after the clarification and
    # fails (a question vs a question: content only); on an ANSWER turn it is the wrong action
    async with stub_server(lambda body: "Which one do you mean?") as (url, _):
        cfg = ServeConfig(env="toy", queue=str(tmp_path / "q.db"), run_dir=str(tmp_path / "run"), n_conversations=6,
                          max_epochs=1, poll_s=0.05, concurrency=4, content_pairs="drop")
        summary = await asyncio.wait_for(serve(cfg, argparse.Namespace(policy=url, max_tokens=8)), 60)
    assert summary["episodes"] == 9 and summary["content_dropped"] == 3
    assert summary["pairs"] == summary["pairs_action"] == 6 and summary["pairs_content"] == 0
    with open_queue(str(tmp_path / "q.db")) as q:
        pairs = q.lease(100, consumer="check").pairs
    assert len(pairs) == 6 and all(p.contrast == "action" for p in pairs)
