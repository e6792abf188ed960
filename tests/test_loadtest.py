"""The load tester itself, on small fast runs against the built-in fake server (loopback only).

Counts must add up, retries and timeouts must be counted, open-loop latency must include
queueing delay (no coordinated omission), and nothing may hang.
"""
import asyncio
import json
import time

import aiohttp
import pytest

from simkit.loadtools.fakeserver import FakeConfig, FakeServer
from simkit.loadtools.loadtest import LoadConfig, check_targets, is_loopback, run_loadtest, write_outputs

ROLES = ("policy", "classifier", "simulator")


def _cfg(**kw) -> LoadConfig:
    fake = kw.pop("fake", {})
    base = dict(fake_in_process=True, live=False, plot=False, interval=0.2, concurrency=20, episodes=60,
                duration=20.0, timeout=5.0, max_retries=3, fake={"latency_ms": 2.0, **fake})
    return LoadConfig(**{**base, **kw})


async def _run(cfg: LoadConfig, limit: float = 30.0) -> dict:
    return await asyncio.wait_for(run_loadtest(cfg), limit)  # never hangs


def _check_accounting(rep: dict) -> None:
    """requests = successes + failures (+ cancelled); attempts = requests + retries."""
    tot = rep["requests"]
    for role, d in tot["per_role"].items():
        assert d["calls"] == d["successes"] + d["failures"], role
        assert d["attempts"] == d["calls"] + d["retries"] + d["cancelled"], role
        assert d["attempts"] == d["attempts_ok"] + d["attempts_failed"] + d["cancelled"], role
        assert d["attempts_ok"] == d["successes"], role
        assert sum(d["errors"].values()) == d["attempts_failed"], role
    for k in ("calls", "successes", "failures", "retries", "attempts"):
        assert tot[k] == sum(d[k] for d in tot["per_role"].values())
    ep = rep["episodes"]
    assert ep["finished"] == ep["ok"] + ep["failed"]
    assert ep["started"] == ep["finished"] + ep["cancelled"]


async def test_closed_loop_counts_add_up(tmp_path):
    rep = await _run(_cfg(episodes=80, fake={"clarify_rate": 0.5}))
    _check_accounting(rep)
    ep, per = rep["episodes"], rep["requests"]["per_role"]
    assert rep["mode"] == "closed" and rep["stopped_by"] == "episodes"
    assert ep["finished"] == ep["ok"] == 80 and ep["cancelled"] == 0
    assert rep["requests"]["failures"] == rep["requests"]["retries"] == 0
    # every policy turn is classified; clarifying turns (fake server: ~half) get simulated
    assert per["policy"]["successes"] == per["classifier"]["successes"] == ep["turns"]
    assert 80 < ep["turns"] <= 80 * 3 and per["simulator"]["successes"] > 0
    assert sum(ep["first_action"].values()) == 80 and set(ep["first_action"]) == {"ANSWER", "CLARIFY"}
    assert rep["server"]["requests"] == rep["requests"]["attempts"]  # the server saw exactly what we sent
    for role in ROLES:
        q = per[role]["latency_s"]
        assert q["p50"] <= q["p90"] <= q["p99"] <= q["max"] and q["p50"] >= 0.002
    assert rep["tokens"]["completion"] > 0 and rep["client"]["rss_mb_max"] > 0
    assert rep["timeseries"] and {"t", "requests_per_s", "latency_p99_ms", "episodes_per_s"} <= set(rep["timeseries"][0])
    files = write_outputs(rep, tmp_path / "run", plot=True)
    assert json.loads((tmp_path / "run" / "report.json").read_text())["episodes"]["finished"] == 80
    assert (tmp_path / "run" / "loadtest.png").stat().st_size > 1000 and "plot" in files


async def test_error_injection_retries_are_counted():
    rep = await _run(_cfg(episodes=60, max_retries=4, fake={"error_rate": 0.3, "seed": 1}))
    _check_accounting(rep)
    tot = rep["requests"]
    assert tot["retries"] > 10
    errors = sum(sum(d["errors"].values()) for d in tot["per_role"].values())
    assert errors == rep["server"]["errors_injected"] and set().union(*(d["errors"] for d in tot["per_role"].values())) == {"500"}
    # a call fails only after 1 + max_retries 500s in a row: rare at 30%
    assert tot["failures"] == rep["episodes"]["failed"] <= 3
    assert errors == tot["retries"] + tot["failures"]


async def test_open_loop_latency_includes_queueing_delay():
    """Server with one slot (5 ms/request, ~100 episodes/s at most) and arrivals at 400/s:
    latency from the intended start grows with the queue, far above the service time."""
    rep = await _run(_cfg(rate=400.0, arrival="uniform", duration=0.25, episodes=None,
                          fake={"latency_ms": 5.0, "max_concurrency": 1, "clarify_rate": 0.0}))
    _check_accounting(rep)
    ep = rep["episodes"]
    assert rep["mode"] == "open" and ep["latency_from"] == "intended start"
    assert ep["finished"] == ep["started"] >= 90  # ~100 arrivals, none lost
    service = 2 * 0.005  # policy + classifier, unloaded
    assert ep["latency_s"]["p50"] > 10 * service
    assert ep["latency_s"]["max"] > 0.5 * ep["finished"] * service  # the last arrivals waited for the backlog
    assert rep["requests"]["latency_s"]["p50"] > 5 * 0.005  # requests queue at the server, too
    assert rep["schedule"]["achieved_rate_per_s"] < 400


async def test_open_loop_under_capacity_latency_is_service_time():
    rep = await _run(_cfg(rate=100.0, arrival="uniform", duration=0.3, episodes=None,
                          fake={"latency_ms": 2.0, "clarify_rate": 0.0}))
    ep = rep["episodes"]
    assert ep["finished"] == ep["started"] >= 25
    assert ep["latency_s"]["p50"] < 0.25  # ~2 x 2 ms + overhead; no backlog


async def test_stalls_end_in_counted_timeouts_and_never_hang():
    t0 = time.monotonic()
    rep = await _run(_cfg(episodes=40, timeout=0.3, max_retries=1, fake={"stall_rate": 0.25, "seed": 3}))
    assert time.monotonic() - t0 < 20
    _check_accounting(rep)
    per = rep["requests"]["per_role"]
    timeouts = sum(d["errors"].get("timeout", 0) for d in per.values())
    assert timeouts > 0 and timeouts == rep["server"]["stalls_injected"]
    assert rep["episodes"]["finished"] == 40
    assert rep["episodes"]["failed"] == rep["requests"]["failures"] > 0  # stalled twice in a row: failed, counted


async def test_hard_stop_cancels_in_flight_episodes():
    """Every request stalls, timeouts are long: the drain deadline ends the run, counting the rest."""
    t0 = time.monotonic()
    rep = await _run(_cfg(episodes=None, duration=0.3, drain=0.3, timeout=60.0, fake={"stall_rate": 1.0}), 15)
    assert time.monotonic() - t0 < 10
    _check_accounting(rep)
    ep = rep["episodes"]
    assert rep["stopped_by"].startswith("drain timeout")
    assert ep["started"] == 20 and ep["finished"] == 0 and ep["cancelled"] == 20
    assert rep["requests"]["per_role"]["policy"]["cancelled"] == 20


def test_remote_targets_are_refused():
    for url in ("http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:9/v1", "http://127.0.0.9/v1"):
        assert is_loopback(url), url
    for url in ("http://10.0.0.1:8000/v1", "https://api.openai.com/v1", "http://192.168.1.2/v1"):
        assert not is_loopback(url), url
    with pytest.raises(ValueError, match="allow-remote"):
        check_targets({"policy": ["http://127.0.0.1:1/v1"], "classifier": ["http://10.1.2.3/v1"],
                       "simulator": "grounded"}, allow_remote=False)
    check_targets({"policy": ["http://10.1.2.3/v1"]}, allow_remote=True)


def test_cli_refuses_remote_before_connecting(capsys):
    from simkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["loadtest", "--url", "http://10.9.9.9:8000/v1", "--episodes", "1", "--no-live"])
    assert "allow-remote" in str(e.value.code)


def test_cli_runs_with_fake_server_process(tmp_path, capsys):
    from simkit.cli import main

    out = tmp_path / "lt"
    assert main(["loadtest", "-c", "8", "-n", "30", "--fake-latency-ms", "1", "--out", str(out), "--no-live",
                 "--no-plot", "--classifier-url", "rule"]) == 0
    text = capsys.readouterr().out
    assert "episodes: 30 finished" in text and "report:" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["requests"]["offline_roles"] == {"classifier": "rule"} and "classifier" not in rep["requests"]["per_role"]
    assert rep["server"]["cpu_us_per_request"] is not None  # its own process
    assert rep["config"]["fake"]["latency_ms"] == 1.0


def test_cli_help_is_complete(capsys):
    from simkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["loadtest", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--rate", "--concurrency", "--episodes", "--duration", "--allow-remote", "--fake-error-rate",
                 "--fake-stall-rate", "--fake-latency-dist", "--out", "--no-live"):
        assert flag in text


async def test_fake_server_replies_like_vllm():
    async with FakeServer(FakeConfig(latency_ms=0.0)) as srv, aiohttp.ClientSession() as s:
        async with s.get(srv.base_url + "/health") as r:
            assert r.status == 200
        async with s.get(srv.url + "/models") as r:
            assert (await r.json())["data"][0]["id"] == "fake-model"

        async def chat(content: str, **kw) -> dict:
            async with s.post(srv.url + "/chat/completions",
                              json={"model": "m", "messages": [{"role": "user", "content": content}], **kw}) as r:
                assert r.status == 200
                return await r.json()

        from simkit import prompts
        clf = prompts.render("classifier/fewshot", response="Do you mean the oak or the tower?")
        assert (await chat(clf, max_tokens=4))["choices"][0]["message"]["content"] == "Yes"
        clf = prompts.render("classifier/fewshot", response="It is 20 meters tall.")
        body = await chat(clf, max_tokens=4)
        assert body["choices"][0]["message"]["content"] == "No"
        assert body["object"] == "chat.completion" and body["model"] == "m" and body["id"].startswith("chatcmpl-")
        assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 1
        a, b = await chat("How tall is it?"), await chat("How tall is it?")
        assert a["choices"] == b["choices"]  # deterministic per request
        async with s.post(srv.url + "/chat/completions", data=b"{not json") as r:
            assert r.status == 400
        async with s.get(srv.base_url + "/nope") as r:
            assert r.status == 404
        assert srv.stats.requests == 5 and srv.stats.responses == 4 and srv.stats.bad_requests == 1


async def test_engine_never_starves_on_episodes_that_finish_without_waiting():
    """An endless task stream whose episodes never suspend (offline roles) must still yield
    results (before: one worker spun forever and the consumer never ran)."""
    import contextlib
    import gc
    import itertools

    import simkit
    from simkit import engine
    env = simkit.make("toy", size=10)
    before = gc.get_threshold()
    n = 0
    gen = simkit.run_episodes(env, itertools.cycle(env.tasks("train")), simkit.OraclePolicy(), concurrency=4)

    async def consume() -> None:
        nonlocal n
        async with contextlib.aclosing(gen):
            async for _ in gen:
                n += 1
                if n == 1:
                    assert gc.get_threshold()[0] >= (engine.GC_GEN0_THRESHOLD or 0)  # tuned while running
                if n >= 500:
                    break

    await asyncio.wait_for(consume(), 10)
    assert n == 500 and gc.get_threshold() == before  # GC settings restored after the run
