"""1,000 concurrent episodes through one `simkit env-server` vs in-process `run_episodes`, same run.

    SIMKIT_DATA_DIR=/work/shared/data .venv/bin/python bench/bench_env_server.py --episodes 1000

Both sides play the same tasks (PACIFIC eval, offline classifier and simulator, so the env work is
what differs) with the same policy: `simkit.Policy` over the fake OpenAI server (its own process,
fixed latency). In-process: `run_episodes(simkit.make(env), ...)`. Remote: `run_episodes(
simkit.RemoteEnv(url, env), ...)` against an env-server subprocess. Step latency is the time of
`act` + `advance` per policy turn (the env's share of a turn: in-process the classify/score/simulate
calls, remote the HTTP step that runs them). Reported: episodes/s, p50/p99 step latency, each as
remote / in-process, and the check that no episode is lost or crossed (every trajectory matches its
own task, and the remote one equals the in-process one but for timing).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import simkit  # noqa: E402
from simkit.loadtools.fakeserver import FakeConfig, start_fake_server  # noqa: E402
from simkit.roles.build import RolesConfig, build_roles  # noqa: E402
from simkit.loadtools.testing import free_port, start_process  # noqa: E402


class Timed:
    """An episode whose act + advance time per policy turn is recorded (everything else passes through)."""

    def __init__(self, ep, lat: list[float]):
        self._ep, self._lat, self._t = ep, lat, None

    def __getattr__(self, name):
        return getattr(self._ep, name)

    async def act(self, text, reply=None):
        t = time.perf_counter()
        out = await self._ep.act(text, reply)
        self._t = time.perf_counter() - t
        return out

    async def advance(self):  # the engine calls it after every act, the last one too
        t = time.perf_counter()
        out = await self._ep.advance()
        if self._t is not None:
            self._lat.append(self._t + time.perf_counter() - t)
            self._t = None
        return out


class TimedEnv:
    def __init__(self, env, lat: list[float]):
        self._env, self._lat = env, lat

    def __getattr__(self, name):
        return getattr(self._env, name)

    def episode(self, task):
        return Timed(self._env.episode(task), self._lat)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(env, tasks, policy, concurrency: int) -> dict:
    lat: list[float] = []
    t0 = time.perf_counter()
    trajs = await simkit.collect(TimedEnv(env, lat), tasks, policy, concurrency=concurrency)
    wall = time.perf_counter() - t0
    return {"trajs": trajs, "wall_s": wall, "episodes_per_s": len(trajs) / wall, "steps": len(lat),
            "step_p50_ms": 1e3 * pct(lat, 0.5), "step_p99_ms": 1e3 * pct(lat, 0.99)}


def strip(t) -> dict:
    d = t.model_dump(exclude={"started_at", "duration_s"})
    for turn in d["turns"]:
        turn.pop("latency_s")
    return d


async def bench(args, fake_url: str, server_url: str) -> dict:
    roles = build_roles(RolesConfig.model_validate({"policy": {"url": fake_url}}))
    local = simkit.make(args.env)
    split = list(local.splits())[-1]
    tasks = local.tasks(split)[:args.episodes]
    remote = simkit.RemoteEnv(server_url, args.env, max_connections=args.concurrency)
    rtasks = remote.tasks(split)[:args.episodes]
    await run(local, tasks, roles.policy, args.concurrency)  # warm-up: every connection opened, caches filled
    await run(remote, rtasks, roles.policy, args.concurrency)
    out = {}
    for rep in range(args.repeats):
        for name, env, ts in (("in_process", local, tasks), ("remote", remote, rtasks)):
            r = await run(env, ts, roles.policy, args.concurrency)
            if name not in out or r["wall_s"] < out[name]["wall_s"]:
                out[name] = r
    by_task = {t.id: t for t in tasks}
    a = {t.task_id: t for t in out["in_process"].pop("trajs")}
    b = {t.task_id: t for t in out["remote"].pop("trajs")}
    lost = len(tasks) - len(b)
    crossed = sum(t.prompt != by_task[k].prompt or t.gold_action != by_task[k].gold_action for k, t in b.items())
    differ = sum(strip(a[k]) != strip(b[k]) for k in b if k in a)
    failed = sum(t.status != "ok" for t in b.values())
    await remote.aclose()
    await roles.aclose()
    ip, rm = out["in_process"], out["remote"]
    return {"env": args.env, "split": split, "episodes": len(tasks), "concurrency": args.concurrency,
            "policy_latency_ms": args.latency_ms, "in_process": ip, "remote": rm,
            "ratio_throughput": rm["episodes_per_s"] / ip["episodes_per_s"],
            "ratio_step_p50": rm["step_p50_ms"] / ip["step_p50_ms"],
            "ratio_step_p99": rm["step_p99_ms"] / ip["step_p99_ms"],
            "lost": lost, "crossed": crossed, "failed": failed, "differ_from_in_process": differ}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--env", default="pacific")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=1000)
    p.add_argument("--latency-ms", type=float, default=50.0, help="fake policy latency")
    p.add_argument("--repeats", type=int, default=1, help="runs per side; the fastest is kept")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with start_fake_server(FakeConfig(latency_ms=args.latency_ms)) as fake, \
            start_process([sys.executable, "-m", "simkit.envserver.server", "--env", args.env, "--port", str(port)],
                          url + "/health", timeout=180):
        res = asyncio.run(bench(args, fake.url, url))
        import urllib.request

        with urllib.request.urlopen(url + "/metrics") as r:
            res["server_metrics"] = json.loads(r.read())
    print(json.dumps(res, indent=1))
    ip, rm = res["in_process"], res["remote"]
    print(f"\n{res['episodes']} episodes of {res['env']} at concurrency {res['concurrency']}, fake policy "
          f"{res['policy_latency_ms']:g} ms")
    print(f"throughput  in-process {ip['episodes_per_s']:8.1f} ep/s   env-server {rm['episodes_per_s']:8.1f} ep/s   "
          f"ratio {res['ratio_throughput']:.2f}")
    print(f"step p50    in-process {ip['step_p50_ms']:8.3f} ms     env-server {rm['step_p50_ms']:8.3f} ms     "
          f"ratio {res['ratio_step_p50']:.1f}")
    print(f"step p99    in-process {ip['step_p99_ms']:8.3f} ms     env-server {rm['step_p99_ms']:8.3f} ms     "
          f"ratio {res['ratio_step_p99']:.1f}")
    print(f"lost {res['lost']}, crossed {res['crossed']}, failed {res['failed']}, "
          f"differ from in-process {res['differ_from_in_process']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0 if res["lost"] == res["crossed"] == res["failed"] == res["differ_from_in_process"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
