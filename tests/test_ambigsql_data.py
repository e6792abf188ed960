"""AmbigSQL builder, loader and env on the real shared Spider data (no mocks, no skips)."""
from __future__ import annotations

import json
import os
import random
import time
from collections import Counter

import pytest

import simkit
from environments.ambigsql import build as builder
from environments.ambigsql import sqlexec
from simkit.types import ANSWER, CLARIFY


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ambigsql-cache")
    old = os.environ.get("SIMKIT_CACHE_DIR")
    os.environ["SIMKIT_CACHE_DIR"] = str(d)
    yield d
    if old is None:
        os.environ.pop("SIMKIT_CACHE_DIR", None)
    else:
        os.environ["SIMKIT_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def env(data_dir, cache_dir):
    """The env as a user gets it: built lazily from the shared data, cached by input hash."""
    e = simkit.make("ambigsql")
    t0 = time.time()
    e.splits()
    e.build_s = time.time() - t0
    yield e
    e.runner.close()


@pytest.fixture(scope="module")
def examples(env):
    return env.dataset["examples"]


def test_build_stats_and_cache(env, cache_dir, data_dir):
    stats = env.stats()["splits"]
    train, test = stats["train"], stats["test"]
    assert train["questions"] == 6726 and test["questions"] == 1034
    # databases missing from the shared copy: baseball_1 and soccer_1 (train), wta_1 (test)
    assert train["skipped_missing_db"] == 96 and train["missing_dbs"] == ["baseball_1", "soccer_1"]
    assert test["skipped_missing_db"] == 62 and test["missing_dbs"] == ["wta_1"]
    assert test["skipped_gold_error"] == 0 and train["skipped_gold_error"] <= 3
    for s in (train, test):
        assert s["answer"] == s["questions"] - s["skipped_missing_db"] - s["skipped_gold_error"]
        assert s["clarify"] == sum(s["types"].values()) > 0.3 * s["answer"]
        assert all(s["types"][t] > 0.05 * s["clarify"] for t in builder.TYPES), s["types"]
    sizes = env.splits()  # the built train split is carved into train + dev (database-disjoint)
    assert list(sizes) == ["train", "dev", "test"] and sizes["test"] == test["conversations"]
    assert sizes["train"] + sizes["dev"] == train["conversations"]
    assert env.build_s < 60
    # built once, cached under $SIMKIT_CACHE_DIR by input hash; a second env only loads it
    files = list(cache_dir.glob("ambigsql-*.json"))
    assert len(files) == 1 and builder.input_fingerprint(data_dir / "spider", 0) in files[0].name
    t0 = time.time()
    assert simkit.make("ambigsql").splits() == env.splits()
    assert time.time() - t0 < 10


def test_every_gold_sql_executes(env, examples):
    dbs = builder.Databases(env.spider_dir / "database")
    try:
        failures = [(e["id"], e["gold_sql"]) for e in {(e["db_id"], e["gold_sql"]): e for e in examples}.values()
                    if not dbs.run(e["db_id"], e["gold_sql"]).ok]
    finally:
        dbs.close()
    assert not failures, failures[:5]


def test_disambiguated_sql_differs_from_an_alternative_reading(env, examples):
    clarify = [e for e in examples if e["gold_action"] == "CLARIFY"]
    rng = random.Random(0)
    sample = [e for e in clarify if e["split"] == "test"] + rng.sample([e for e in clarify if e["split"] == "train"], 400)
    dbs = builder.Databases(env.spider_dir / "database")
    try:
        for e in sample:
            gold = dbs.run(e["db_id"], e["gold_sql"])
            order = sqlexec.has_top_level_order_by(e["gold_sql"])
            assert e["alternatives"], e["id"]
            differs = []
            for alt in e["alternatives"]:
                res = dbs.run(e["db_id"], alt)
                differs.append(res.ok and not sqlexec.results_match(gold.rows, res.rows, order))
            assert all(differs), (e["id"], e["alternatives"])
    finally:
        dbs.close()


def test_ambiguous_questions_are_well_formed(examples):
    by_source = Counter((e["split"], e["source"]) for e in examples)
    assert max(by_source.values()) == 2  # at most the original plus one ambiguous variant
    for e in examples:
        if e["gold_action"] == "ANSWER":
            assert e["question"] == e["original_question"] and e["ambiguity"] == "none"
            continue
        assert e["ambiguity"] in builder.TYPES and e["subtype"]
        assert e["question"] != e["original_question"] and e["disambiguated_question"] == e["original_question"]
        assert e["clarifying_question"].endswith("?") and e["clarification"]
        for h in e["hidden"]:  # what the user must supply is not in the ambiguous question
            assert not builder._mentions(e["question"], h), (e["id"], h, e["question"])
    # the gold SQL must be classified as an answer, the reference question as a clarification
    rule = simkit.RuleClassifier.classify_sync
    assert all(rule(e["gold_sql"]) == ANSWER for e in examples)
    assert all(rule(e["clarifying_question"]) == CLARIFY for e in examples if e["gold_action"] == "CLARIFY")


def test_build_is_deterministic_and_seeded(data_dir):
    spider = data_dir / "spider"
    a, b, c = (builder.build(spider, seed=s, splits=("test",), limit=150) for s in (3, 3, 4))
    dump = lambda r: json.dumps([e.__dict__ for e in r.examples], sort_keys=True)  # noqa: E731
    assert dump(a) == dump(b) and dump(a) != dump(c)


def test_tasks_carry_prompt_goal_and_grounding(env):
    tasks = env.tasks("test")
    assert {t.gold_action for t in tasks} == {CLARIFY, ANSWER}
    t = next(t for t in tasks if t.gold_action == CLARIFY)
    assert len(t.prompt) == 1 and t.prompt[0].role == "user"
    assert "CREATE TABLE" in t.prompt[0].content and t.meta["question"] in t.prompt[0].content
    assert t.reference.endswith("?") and t.user_reply and t.goal.upper().startswith(("SELECT", "WITH"))
    assert t.grounding["intent"] == t.meta["original_question"] and t.meta["alternatives"]
    a = next(t for t in tasks if t.gold_action == ANSWER)
    assert a.reference == a.goal and a.user_reply is None
    assert "SQLite query" in env.system_prompt
    with pytest.raises(KeyError, match="train"):
        env.tasks("validation")


async def test_oracle_scores_one_through_the_engine(env):
    tasks = env.tasks("test") + random.Random(1).sample(env.tasks("train"), 300)
    trajs = await simkit.collect(env, tasks, simkit.OraclePolicy(), concurrency=32)
    assert len(trajs) == len(tasks) and all(t.status == "ok" and t.terminated for t in trajs)
    bad = [(t.task_id, t.reward, t.turn_score) for t in trajs if t.reward != 1.0 or t.turn_score != 1.0]
    assert not bad, bad[:5]
    assert all(t.first_action == t.gold_action for t in trajs)
    clarify = [t for t in trajs if t.gold_action == CLARIFY]
    assert clarify and all([x.role for x in t.turns] == ["assistant", "user", "assistant"] for t in clarify)
    assert all(env.success(t.reward) for t in trajs)


async def test_guessing_or_the_wrong_reading_scores_zero(env):
    task = next(t for t in env.tasks("test") if t.gold_action == CLARIFY)
    wrong = task.meta["alternatives"][0]
    # guessing at once: wrong turn (0) and, with the other reading's SQL, a failed outcome
    await env.reset(task)
    step = await env.step(f"```sql\n{wrong}\n```")
    assert step.terminated and step.reward == 0.0 and env.current.turn_score == 0.0
    # asking, then answering the other reading: right turn, wrong outcome (post-clarify EM 0)
    await env.reset(task)
    step = await env.step(task.reference)
    assert step.observation == task.user_reply and env.current.turn_score == 1.0
    step = await env.step(wrong)
    assert step.terminated and step.reward == 0.0 and not step.info["success"]
    # hostile SQL from the policy scores zero
    env.runner.timeout_s = 0.5
    try:
        answer = next(t for t in env.tasks("test") if t.gold_action == ANSWER)
        for text in ("DROP TABLE singer",
                     "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"):
            assert await env.score(text, answer.goal, answer) == 0.0
        # the official (Spider test-suite) match runs the first statement only; the DROP never runs
        assert await env.score(f"{answer.goal}; DROP TABLE singer", answer.goal, answer) == 1.0
        assert await env.score(f"Here you go:\n```sql\n{answer.goal};\n```", answer.goal, answer) == 1.0
    finally:
        env.runner.timeout_s = sqlexec.DEFAULT_TIMEOUT_S


def test_cli_builds_a_file_the_env_loads(data_dir, tmp_path, capsys):
    from simkit.cli import main

    out = tmp_path / "ambigsql.json"
    assert main(["data", "build-ambigsql", "--spider", str(data_dir / "spider"), "--out", str(out),
                 "--limit", "80", "--examples", "3", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "missing-db" in printed and "CLARIFY" in printed and printed.count("  User: ") >= 3
    env = simkit.make("ambigsql", path=out)
    try:
        sizes = env.splits()
        assert list(sizes) == ["train", "dev", "test"] and 80 <= sizes["train"] + sizes["dev"] <= 160
    finally:
        env.runner.close()


def test_envs_command_lists_ambigsql_with_sizes(env, capsys):
    from simkit.cli import main

    assert main(["envs"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("ambigsql"))
    sizes = env.splits()
    assert f"train={sizes['train']}, dev={sizes['dev']}, test={sizes['test']}" in line


def test_templates_register_by_decorator_in_a_fixed_order():
    """The build tries templates in registration order (then a seeded shuffle): no method-name strings."""
    import random

    import pytest

    from environments.ambigsql.build import Deriver, template

    d = Deriver(dbs=None, rng=random.Random(0))
    names = {t: [f.__name__ for f in d.templates(t)] for t in ("information", "population", "presentation")}
    assert names == {"information": ["derive_select_column", "derive_where_value", "derive_where_threshold"],
                     "population": ["derive_table"],
                     "presentation": ["derive_order_direction", "derive_limit", "derive_group_by"]}
    with pytest.raises(ValueError, match="unknown ambiguity type"):
        template("style")


def test_dev_split_is_database_disjoint_and_carved_from_train(env, examples):
    train, dev = env.tasks("train"), env.tasks("dev")
    train_dbs, dev_dbs = {t.meta["db_id"] for t in train}, {t.meta["db_id"] for t in dev}
    assert not train_dbs & dev_dbs
    old_train = [e["id"] for e in examples if e["split"] == "train"]
    assert sorted(t.id for t in train + dev) == sorted(old_train)  # dev + train = the old train
    all_dbs = train_dbs | dev_dbs
    assert len(dev_dbs) == round(builder.DEV_FRACTION * len(all_dbs))  # ~12% of the train databases
    assert dev_dbs == builder.dev_databases(all_dbs, env.seed)  # fixed for the seed
    assert builder.dev_databases(all_dbs, env.seed + 1) != dev_dbs
    assert {t.meta["split"] for t in dev} == {"dev"} and {t.gold_action for t in dev} == {CLARIFY, ANSWER}
    assert next(iter(env.splits())) == "train" and list(env.splits())[-1] == "test"  # defaults unchanged
    no_dev = simkit.make("ambigsql", dev_fraction=0)
    try:
        assert list(no_dev.splits()) == ["train", "test"] and len(no_dev.tasks("train")) == len(old_train)
    finally:
        no_dev.runner.close()


def test_sealed_test_sample_names_test_tasks(env):
    from simkit.evaluation.evaluate import load_tasks_file

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "results", "sealed_test_ambigsql.json")
    doc = json.load(open(path))
    tasks = load_tasks_file(path, env.tasks("test"))
    assert [t.id for t in tasks] == doc["task_ids"] and len(tasks) == doc["n"] == 400
    with pytest.raises(SystemExit, match="400 task ids not in the split: ambigsql-test-00189-amb"):
        load_tasks_file(path, env.tasks("train"))
