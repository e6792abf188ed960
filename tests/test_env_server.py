"""`simkit env-server` and `simkit.RemoteEnv`: real server subprocesses on loopback.

Parity (the same policy replies give the same trajectories remote and in-process, 50 tasks of each
env), every error path (400 naming the field, 401, 404, 405, 409, 502, 503 + Retry-After, 504), TTL
expiry (counted) including the episodes of a killed client, and the Node example.
"""
import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import aiohttp
import pytest

import simkit
from simkit.loadtools.fakeserver import FakeConfig, start_fake_server
from simkit.roles.build import RolesConfig, build_roles
from simkit.loadtools.testing import free_port, start_process

REPO = Path(__file__).resolve().parent.parent
ENVS = ("toy", "ambigsql", "pacific", "abgcoqa")
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fake():
    with start_fake_server(FakeConfig(latency_ms=0)) as srv:
        yield srv


def env_server(*flags: str, env: dict | None = None):
    port = free_port()
    args = [sys.executable, "-m", "simkit.envserver.server", "--port", str(port), *flags]
    cm = start_process(args, f"http://127.0.0.1:{port}/health", env=env, timeout=120)
    return cm, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(fake):
    """All four envs; classifier and simulator are the fake server's LLM roles."""
    cm, url = env_server("--env", ",".join(ENVS), "--simulator", fake.url, "--simulator-model", "simulator",
                         "--classifier", fake.url, "--classifier-model", "classifier")
    with cm:
        yield url


@pytest.fixture(scope="module")
def stalled():
    with start_fake_server(FakeConfig(latency_ms=0, stall_rate=1.0)) as srv:
        yield srv


KEYS = ("key-one", "key-two")


@pytest.fixture(scope="module")
def strict(stalled):
    """Toy only, auth on, 3 open episodes at most, 1 s TTL, 0.5 s step timeout, a simulator that never answers."""
    cm, url = env_server("--env", "toy", "--max-open", "3", "--ttl-s", "1", "--step-timeout-s", "0.5",
                         "--simulator", stalled.url, "--simulator-model", "simulator",
                         env={"SIMKIT_ENV_SERVER_KEYS": ",".join(KEYS)})
    with cm:
        yield url


def call(method: str, url: str, body=None, headers=None, raw: bytes | None = None):
    """(status, headers, JSON body) of one request; errors are answers, not exceptions."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    hdrs = {**(JSON if data is not None else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


AUTH = {"Authorization": f"Bearer {KEYS[1]}"}


def new_episode(url: str, headers=None, **body) -> str:
    status, _, out = call("POST", url + "/episodes", {"env": "toy", "split": "test", "index": 0, **body}, headers)
    assert status == 201, out
    return out["episode_id"]


def error(status_body, status: int, param: str | None = None, has: str = ""):
    got, _, body = status_body
    assert got == status, body
    assert body["error"]["code"] == status and has in body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body


# ------------------------------------------------------------------------------ parity
class Mixed:
    """A deterministic policy: the oracle on a third of the tasks (non-zero rewards), the fake LLM elsewhere."""

    def __init__(self, llm):
        self.llm, self.oracle = llm, simkit.OraclePolicy()

    async def respond(self, messages, instruction=None, task=None, **sampling):
        who = self.oracle if zlib.crc32(task.id.encode()) % 3 == 0 else self.llm
        return await who.respond(messages, instruction, task=task, **sampling)


SCORES = ("reward", "turn_score", "turn_score_question_only")


def comparable(traj) -> dict:
    d = traj.model_dump(exclude={"started_at", "duration_s", *SCORES})
    for t in d["turns"]:
        t.pop("latency_s")  # wall-clock of the policy call, not content
    d["scores"] = tuple(getattr(traj, k) for k in SCORES)
    return d


def scores(d: dict) -> tuple:
    """The scores, compared to 1e-5: Abg-CoQA's float32 MiniLM embeddings move by 1e-6 with how
    concurrent requests happen to be batched (in-process from one run to the next, too)."""
    return tuple(-1.0 if x is None else x for x in d.pop("scores"))


async def test_parity_50_tasks_of_each_env(server, fake):
    roles = build_roles(RolesConfig.model_validate({
        "policy": {"url": fake.url}, "simulator": {"url": fake.url, "model": "simulator"},
        "classifier": {"url": fake.url, "model": "classifier"}}))
    policy = Mixed(roles.policy)
    try:
        for name in ENVS:
            remote = simkit.RemoteEnv(server, name)
            local = simkit.make(name, classifier=roles.classifier, simulator=roles.simulator)
            split = list(local.splits())[-1]
            assert remote.splits() == local.splits() and remote.max_turns == local.max_turns
            tasks = local.tasks(split)[:50]
            assert [t.model_dump() for t in remote.tasks(split)[:50]] == [t.model_dump() for t in tasks]
            a = await simkit.collect(local, tasks, policy, concurrency=16)
            b = await simkit.collect(remote, remote.tasks(split)[:50], policy, concurrency=16)
            await remote.aclose()
            await local.aclose()
            la, rb = {t.task_id: comparable(t) for t in a}, {t.task_id: comparable(t) for t in b}
            assert len(b) == 50 and set(rb) == {t.id for t in tasks}, name  # none lost, none crossed
            assert all(t["status"] == "ok" for t in rb.values()), name
            sa, sb = ([x for k in sorted(d) for x in scores(d[k])] for d in (la, rb))
            assert sa == pytest.approx(sb, abs=1e-5, rel=0), name
            assert la == rb, name
            kinds = {(t.first_action, len(t.turns)) for t in b}
            assert len(kinds) >= 2 and any(t.reward > 0 for t in b), (name, kinds)  # the episodes differ
    finally:
        await roles.aclose()


# ------------------------------------------------------------------------------ the API
def test_listing_tasks_openapi_and_metrics(server):
    status, _, out = call("GET", server + "/envs")
    assert status == 200 and [e["name"] for e in out["envs"]] == list(ENVS)
    toy = out["envs"][0]
    assert toy["splits"] == {"train": 200, "test": 50} and toy["metric"] == "F1"
    assert set(toy["actions"]) == {"CLARIFY", "ANSWER"} and toy["config_keys"] == ["clarify_rounds", "max_turns"]
    sql = call("GET", server + "/envs/ambigsql")[2]
    assert sql["config_keys"] == ["clarify_rounds", "exec_match", "max_turns"]  # no paths, workers, sandbox mode
    ids = call("GET", server + "/envs/toy/tasks?split=test")[2]["task_ids"]
    assert len(ids) == 50 and ids[0] == "toy-test-0"
    page = call("GET", server + "/envs/toy/tasks?split=test&limit=5&offset=2&seed=7&full=true")[2]
    assert len(page["task_ids"]) == 5 and page["task_ids"] != ids[2:7]
    assert page["task_ids"] == call("GET", server + "/envs/toy/tasks?split=test&limit=5&offset=2&seed=7")[2]["task_ids"]
    assert [t["id"] for t in page["tasks"]] == page["task_ids"] and page["tasks"][0]["goal"]
    assert call("GET", server + "/envs/toy/tasks/toy-test-3")[2]["id"] == "toy-test-3"
    spec = call("GET", server + "/openapi.json")[2]
    assert spec["openapi"].startswith("3.") and "/episodes/{episode_id}/step" in spec["paths"]
    step = spec["paths"]["/episodes/{episode_id}/step"]["post"]
    assert step["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/StepRequest")
    assert {"StepRequest", "StepResponse", "EpisodeCreate", "Task", "ErrorBody"} <= set(spec["components"]["schemas"])
    m = call("GET", server + "/metrics")[2]
    assert {"open", "created", "expired", "shed", "timeouts"} <= set(m)


def test_an_episode_over_http(server):
    s, _, out = call("POST", server + "/episodes", {"env": "toy", "task_id": "toy-test-0"})
    assert s == 201 and out["observation"][0]["role"] == "system" and out["max_turns"] == 2
    eid, url = out["episode_id"], f"{server}/episodes/{out['episode_id']}"
    s, _, st = call("POST", url + "/step", {"text": "Which one do you mean?"})
    assert s == 200 and st["info"]["action"] == "CLARIFY" and st["observation"] and not st["terminated"]
    s, _, st = call("POST", url + "/step", {"text": "20 meters", "reply": {"model": "m", "completion_tokens": 2}})
    assert st["terminated"] and st["state"]["status"] == "ended" and st["reward"] == st["info"]["score"]
    view = call("GET", url)[2]
    assert view["episode_id"] == eid and [t["role"] for t in view["trajectory"]["turns"]] == ["assistant", "user",
                                                                                               "assistant"]
    assert view["trajectory"]["turns"][2]["model"] == "m" and view["trajectory"]["turns"][2]["completion_tokens"] == 2
    error(call("POST", url + "/step", {"text": "again"}), 409, has="already ended")
    assert call("DELETE", url)[2] == {"episode_id": eid, "deleted": True}
    error(call("GET", url), 404, "episode_id", "was deleted")
    error(call("DELETE", url), 404, "episode_id")
    error(call("POST", url + "/step", {"text": "x"}), 404, "episode_id")


def test_bad_requests_name_the_field(server):
    eid = new_episode(server)
    step = f"{server}/episodes/{eid}/step"
    error(call("POST", step, raw=b'{"text": '), 400, "body", "malformed JSON")
    error(call("POST", step, raw=b'[1, 2]'), 400, "body")
    error(call("POST", step, raw=b'{"text": "a"}', headers={"Content-Type": "text/plain"}), 400, "Content-Type")
    error(call("POST", step, {"text": 5}), 400, "text", "valid string")
    error(call("POST", step, {"txt": "a"}), 400, "text", "txt: Extra inputs are not permitted")
    error(call("POST", step, {"text": "a", "reply": {"completion_tokens": "2"}}), 400, "reply.completion_tokens")
    error(call("POST", step, {"text": "a", "reply": {"tokens": 2}}), 400, "reply.tokens")
    eps = server + "/episodes"
    error(call("POST", eps, {"env": "toy", "split": "test", "index": "0"}), 400, "index", "valid integer")
    error(call("POST", eps, {"env": "toy", "split": "test", "index": -1}), 400, "index")
    error(call("POST", eps, {"env": "toy"}), 400, "task_id")
    error(call("POST", eps, {"env": "toy", "task_id": "toy-test-0", "index": 1}), 400, "task_id")
    error(call("POST", eps, {"env": "toy", "task_id": "toy-test-0", "config": {"max_turn": 3}}), 400,
          "config.max_turn", "allowed: clarify_rounds, max_turns")
    error(call("POST", eps, {"env": "toy", "task_id": "toy-test-0", "config": {"seed": 3}}), 400, "config.seed")
    error(call("POST", eps, {"env": "toy", "task_id": "toy-test-0", "config": {"max_turns": "3"}}), 400,
          "config.max_turns")
    error(call("POST", eps, {"env": "toy", "task_id": "toy-test-0", "config": {"max_turns": 0}}), 400,
          "config.max_turns")
    error(call("GET", server + "/envs/toy/tasks?limit=x"), 400, "limit")
    error(call("GET", server + "/envs/toy/tasks?colour=red"), 400, "colour")
    error(call("POST", server + "/envs/toy/score", {"task_id": "toy-test-0"}), 400, "prediction")
    # not found
    error(call("POST", eps, {"env": "nope", "task_id": "x"}), 404, "env", "served: toy, ambigsql")
    error(call("POST", eps, {"env": "toy", "task_id": "toy-test-999"}), 404, "task_id")
    error(call("POST", eps, {"env": "toy", "split": "dev", "index": 0}), 404, "split")
    error(call("POST", eps, {"env": "toy", "split": "test", "index": 50}), 404, "index")
    error(call("GET", server + "/envs/toy/tasks?split=dev"), 404, "split")
    error(call("GET", server + "/envs/nope"), 404, "env")
    error(call("GET", server + "/episodes/0123"), 404, "episode_id", "no episode")
    error(call("GET", server + "/no/such/route"), 404)
    error(call("PUT", server + "/envs"), 405)
    assert call("GET", server + "/metrics")[2]["bad_requests"] >= 17


async def test_remote_env_interface(server):
    env = simkit.RemoteEnv(server, "toy", config={"max_turns": 3})
    local = simkit.make("toy", max_turns=3)
    task = env.tasks("test")[0]
    assert env.max_turns == 3 and env.success(0.5) and not env.success(0.4) and env.metric_name == "F1"
    obs = await env.reset(task)
    assert obs == [simkit.Message(role="system", content=local.system_prompt), *task.prompt]
    steps = [await env.step(t) for t in ("Which?", "Which one, really?", "Which, again?")]
    await local.reset(local.tasks("test")[0])
    here = [await local.step(t) for t in ("Which?", "Which one, really?", "Which, again?")]
    assert [(s.reward, s.terminated, s.truncated, s.info, s.observation is None) for s in steps] == \
        [(s.reward, s.terminated, s.truncated, s.info, s.observation is None) for s in here]  # simulators differ
    assert steps[-1].truncated and env.current.done
    with pytest.raises(RuntimeError, match="already ended"):
        await env.step("x")
    assert await env.score("20 meters", task.goal, task) == 1.0
    assert await env.classifier.classify("Do you mean the oak?", task) == "CLARIFY"
    assert "remote:" in env.classifier.description
    ep = env.episode(env.tasks("test")[1])
    await ep.start()
    await ep.aclose()
    with pytest.raises(simkit.RemoteEnvError) as e:
        await ep.act("late")
    assert e.value.status == 404 and e.value.param == "episode_id"
    bad = simkit.RemoteEnv(server, "toy", config={"size": 3})
    with pytest.raises(simkit.RemoteEnvError) as e:
        await bad.episode(task).start()
    assert e.value.status == 400 and e.value.param == "config.size"
    await bad.aclose()
    with pytest.raises(simkit.RemoteEnvError):
        simkit.RemoteEnv(server, "nope")
    await env.aclose()


# ------------------------------------------------------------------------------ auth, cap, TTL, timeouts
def test_bearer_auth(strict, monkeypatch):
    error(call("GET", strict + "/envs"), 401)
    assert call("GET", strict + "/envs")[1]["WWW-Authenticate"] == "Bearer"
    error(call("GET", strict + "/envs", headers={"Authorization": "Bearer wrong"}), 401)
    error(call("POST", strict + "/episodes", {"env": "toy", "task_id": "toy-test-0"}), 401)
    for key in KEYS:
        assert call("GET", strict + "/envs/toy", headers={"Authorization": f"Bearer {key}"})[0] == 200
    assert call("GET", strict + "/health")[0] == 200 and call("GET", strict + "/openapi.json")[0] == 200
    with pytest.raises(simkit.RemoteEnvError) as e:
        simkit.RemoteEnv(strict, "toy")
    assert e.value.status == 401
    monkeypatch.setenv("SIMKIT_ENV_SERVER_KEY", KEYS[0])
    assert simkit.RemoteEnv(strict, "toy").splits() == {"train": 200, "test": 50}
    assert call("GET", strict + "/metrics", headers=AUTH)[2]["unauthorized"] >= 5


async def test_cap_answers_503_with_retry_after(strict, monkeypatch):
    ids = [new_episode(strict, AUTH) for _ in range(3)]
    status, headers, body = call("POST", strict + "/episodes", {"env": "toy", "task_id": "toy-test-1"}, AUTH)
    assert status == 503 and int(headers["Retry-After"]) >= 1 and "--max-open 3" in body["error"]["message"]
    assert call("GET", strict + "/metrics", headers=AUTH)[2]["shed"] >= 1
    # RemoteEnv waits Retry-After and gets in once a slot frees
    monkeypatch.setenv("SIMKIT_ENV_SERVER_KEY", KEYS[0])
    env = simkit.RemoteEnv(strict, "toy")
    ep = env.episode(env.tasks("test")[1])
    start = asyncio.create_task(ep.start())
    await asyncio.sleep(0.3)
    assert not start.done()
    assert call("DELETE", f"{strict}/episodes/{ids[0]}", headers=AUTH)[0] == 200
    await asyncio.wait_for(start, 10)
    assert (await ep.act("20 meters")).terminated  # an ended episode no longer counts as open
    for eid in [*ids[1:], ep.id, new_episode(strict, AUTH)]:
        call("DELETE", f"{strict}/episodes/{eid}", headers=AUTH)
    await env.aclose()


CLIENT = """
import sys, time, simkit
env = simkit.RemoteEnv(sys.argv[1], "toy")
import asyncio
async def main():
    eps = [env.episode(t) for t in env.tasks("test")[:2]]
    for ep in eps:
        await ep.start()
    print(" ".join(ep.id for ep in eps), flush=True)
    time.sleep(600)
asyncio.run(main())
"""


def test_killed_client_episodes_expire(strict):
    before = call("GET", strict + "/metrics", headers=AUTH)[2]
    done = new_episode(strict, AUTH, split=None, index=None, task_id="toy-test-1")
    assert call("POST", f"{strict}/episodes/{done}/step", {"text": "20 meters"}, AUTH)[2]["terminated"]
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, strict], stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "SIMKIT_ENV_SERVER_KEY": KEYS[0]})
    try:
        ids = proc.stdout.readline().split()
        assert len(ids) == 2 and call("GET", f"{strict}/episodes/{ids[0]}", headers=AUTH)[0] == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        m = call("GET", strict + "/metrics", headers=AUTH)[2]
        if m["expired"] >= before["expired"] + 2:
            break
        time.sleep(0.2)
    assert m["expired"] == before["expired"] + 2 and m["expired_finished"] >= before["expired_finished"] + 1
    assert m["open"] == 0 and m["held"] == 0
    for eid in [*ids, done]:
        error(call("GET", f"{strict}/episodes/{eid}", headers=AUTH), 404, "episode_id", "expired after 1s idle")


async def test_step_timeout_504_fails_the_episode_and_busy_is_409(strict):
    eid = new_episode(strict, AUTH)  # toy-test-0: a CLARIFY reply asks the simulator, which never answers
    url = f"{strict}/episodes/{eid}/step"
    async with aiohttp.ClientSession(headers=AUTH) as s:
        async def step(text):
            async with s.post(url, json={"text": text}) as r:
                return r.status, await r.json()

        first = asyncio.create_task(step("Which one?"))
        await asyncio.sleep(0.2)
        busy = await step("20 meters")
        status, body = await first
    assert busy[0] == 409 and "still running" in busy[1]["error"]["message"]
    assert status == 504 and body["error"]["type"] == "timeout" and "0.5s" in body["error"]["message"]
    error(call("POST", url, {"text": "x"}, AUTH), 409, has="episode failed: step timed out")
    view = call("GET", f"{strict}/episodes/{eid}", headers=AUTH)[2]
    assert view["state"]["status"] == "failed" and view["trajectory"]["status"] == "failed"
    assert "timed out" in view["trajectory"]["error"]
    m = call("GET", strict + "/metrics", headers=AUTH)[2]
    assert m["timeouts"] >= 1 and m["open"] == 0
    call("DELETE", f"{strict}/episodes/{eid}", headers=AUTH)


async def test_role_error_is_502_and_the_same_failed_trajectory():
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: the simulator gives up at once
    cm, url = env_server("--env", "toy", "--simulator", dead, "--max-retries", "0")
    roles = build_roles(RolesConfig.model_validate({"policy": {"url": dead}, "simulator": {"url": dead},
                                                    "client": {"max_retries": 0}}))
    with cm:
        eid = new_episode(url)
        error(call("POST", f"{url}/episodes/{eid}/step", {"text": "Which one?"}), 502, has="[simulator]")
        env = simkit.RemoteEnv(url, "toy")
        local = simkit.make("toy", simulator=roles.simulator)
        task = env.tasks("test")[0]
        remote = await simkit.run_episode(env, task, simkit.OraclePolicy())
        here = await simkit.run_episode(local, task, simkit.OraclePolicy())
        await env.aclose()
    await roles.aclose()
    assert remote.status == here.status == "failed" and remote.error == here.error and "[simulator]" in here.error


# ------------------------------------------------------------------------------ another language
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_example_plays_an_episode(server):
    out = subprocess.run(["node", str(REPO / "examples" / "env_client.mjs"), server, "toy"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "action=CLARIFY" in out.stdout and "reward=1" in out.stdout and "turns=3" in out.stdout, out.stdout
