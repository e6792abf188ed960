"""simkit's episode engine vs bare request loops, against the same fake server process.

    .venv/bin/python bench/bench_engine.py                       # 100, 1000, 5000 in flight
    .venv/bin/python bench/bench_engine.py --concurrency 1000 --duration 8 --json out.json

The fake server (`simkit.loadtools.fakeserver`, fixed 50 ms latency) runs in its own process pinned to
the last CPU; every client runs in a fresh subprocess pinned to CPU 0, so each measures one
client core. Client modes:
- engine:     full simkit episodes (toy env; Policy + LLMClassifier + LLMSimulator over
              RoleClients with default settings: the "fast" raw HTTP/1.1 transport; classify,
              simulate, score, Trajectory)
- engine-aiohttp: the same on the aiohttp transport
- aiohttp:    bare aiohttp session + semaphore, POST/read/json.loads (client-side ceiling)
- openai:     bare openai.AsyncOpenAI loop, same concurrency
- sequential: one episode at a time with the sync openai client (the authors' reference design)
Requests/s are counted over a window after a warm-up. Ratios are engine / baseline.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SYSTEM = ("You are a helpful assistant. Read the context and the conversation. If the user's request is clear, "
          "answer it directly and concisely. If there is any ambiguity in what the user is asking, ask one short "
          "clarifying question instead of guessing or answering every reading.")
MESSAGES = [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Context: the oak is 20 meters tall and the tower is 300 meters tall.\n"
                                        "How tall is the tower?"}]


def _rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except Exception:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Window:
    """Counts completions; measures rate and CPU between warm-up end and window end."""

    def __init__(self, warmup: float, duration: float):
        self.warmup, self.duration = warmup, duration
        self.n = 0
        self.episodes = 0
        self.result: dict | None = None
        self.stop = asyncio.Event()

    async def run(self, count=None) -> None:
        count = count or (lambda: self.n)
        await asyncio.sleep(self.warmup)
        n0, e0, c0, t0 = count(), self.episodes, time.process_time(), time.perf_counter()
        await asyncio.sleep(self.duration)
        n1, e1, c1, t1 = count(), self.episodes, time.process_time(), time.perf_counter()
        dn = max(1, n1 - n0)
        self.result = {"requests": n1 - n0, "seconds": t1 - t0, "req_per_s": (n1 - n0) / (t1 - t0),
                       "episodes_per_s": (e1 - e0) / (t1 - t0), "cpu_us_per_req": (c1 - c0) / dn * 1e6,
                       "cpu_util": (c1 - c0) / (t1 - t0), "rss_mb": _rss_mb(),
                       "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        self.stop.set()


async def _loop_until(win: Window, n: int, one) -> None:
    async def worker() -> None:
        while not win.stop.is_set():
            await one()
            win.n += 1

    ws = [asyncio.create_task(worker()) for _ in range(n)]
    await win.run()
    for w in ws:
        w.cancel()
    await asyncio.gather(*ws, return_exceptions=True)


async def mode_aiohttp(url: str, n: int, win: Window) -> None:
    import aiohttp

    sem = asyncio.Semaphore(n)
    payload = {"model": "fake-model", "messages": MESSAGES, "temperature": 0.7, "max_tokens": 256}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one() -> None:
            async with sem:
                async with s.post(url + "/chat/completions", data=json.dumps(payload),
                                  headers={"Content-Type": "application/json"}) as r:
                    body = await r.read()
                    json.loads(body)["choices"][0]["message"]["content"]

        await _loop_until(win, n, one)


async def mode_openai(url: str, n: int, win: Window) -> None:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="EMPTY", max_retries=0)

    async def one() -> None:
        r = await client.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=0.7,
                                                 max_tokens=256)
        r.choices[0].message.content

    await _loop_until(win, n, one)
    await client.close()


async def mode_sequential(url: str, n: int, win: Window) -> None:
    """The reference design: one episode at a time, blocking sync SDK calls (run in a thread so
    the window timer can tick; the event loop itself is idle)."""
    import threading

    from openai import OpenAI

    import simkit
    from simkit import prompts
    client = OpenAI(base_url=url, api_key="EMPTY", max_retries=0)
    env = simkit.make("toy", size=1000)
    tasks = env.tasks("train")
    stop = threading.Event()

    def chat(messages, **kw) -> str:
        r = client.chat.completions.create(model="fake-model", messages=messages, **kw)
        win.n += 1
        return r.choices[0].message.content

    def run() -> None:
        for task in itertools.cycle(tasks):
            if stop.is_set():
                return
            msgs = [{"role": "system", "content": env.system_prompt}] + [m.model_dump() for m in task.prompt]
            for turn in range(env.max_turns):
                text = chat(msgs, temperature=0.7, max_tokens=256)
                label = chat([{"role": "user", "content": prompts.render("classifier/fewshot", response=text)}],
                             temperature=0.0, max_tokens=4)
                msgs.append({"role": "assistant", "content": text})
                if "yes" not in label.lower() or turn == env.max_turns - 1:
                    break
                dialogue = "\n".join(f"{m['role'].title()}: {m['content']}" for m in msgs[1:])
                user = chat([{"role": "user", "content": prompts.render("simulator/reply", intent=task.goal,
                                                                        dialogue=dialogue)}],
                            temperature=0.0, max_tokens=96)
                msgs.append({"role": "user", "content": user})
            win.episodes += 1

    th = threading.Thread(target=run, daemon=True)
    th.start()
    await win.run()
    stop.set()
    await asyncio.to_thread(th.join, 10)


async def mode_engine(url: str, n: int, win: Window, transport: str | None = None) -> None:
    import contextlib

    import simkit
    from simkit.roles.agents import LLMClassifier, LLMSimulator

    cfg = simkit.RoleConfig(base_urls=[url], model="fake-model", max_in_flight=n, timeout_s=60)
    if transport:
        cfg.transport = transport
    clients = [simkit.RoleClient(role, cfg, model="fake-model" if role == "policy" else role)  # the fake routes by model
               for role in ("policy", "classifier", "simulator")]
    pc, cc, sc = clients
    env = simkit.make("toy", size=2000, classifier=LLMClassifier(cc, env="toy"), simulator=LLMSimulator(sc, env="toy"))
    policy = simkit.Policy(pc, temperature=0.7, max_tokens=256)
    tasks = itertools.cycle(env.tasks("train"))
    timer = asyncio.create_task(win.run(lambda: sum(c.stats.successes for c in clients)))
    gen = simkit.run_episodes(env, tasks, policy, concurrency=n, progress=False)
    async with contextlib.aclosing(gen):
        async for _ in gen:
            win.episodes += 1
            if win.stop.is_set():
                break
    await timer
    for c in clients:
        await c.aclose()
    failures = sum(c.stats.failures for c in clients)
    win.result["failures"] = failures


async def mode_engine_aiohttp(url: str, n: int, win: Window) -> None:
    """The engine on the aiohttp transport (RoleConfig.transport='aiohttp')."""
    await mode_engine(url, n, win, transport="aiohttp")


MODES = {"engine": mode_engine, "engine-aiohttp": mode_engine_aiohttp, "aiohttp": mode_aiohttp, "openai": mode_openai, "sequential": mode_sequential}


def worker_main(args: argparse.Namespace) -> None:
    if args.uvloop:
        import uvloop  # type: ignore[import-not-found]

        uvloop.install()
    win = Window(args.warmup, args.duration)
    asyncio.run(MODES[args.worker](args.url, args.n, win))
    print("RESULT " + json.dumps(win.result), flush=True)


# --------------------------------------------------------------------------- orchestrator
def _server_stats(base: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(base + "/stats", timeout=10) as r:
        return json.loads(r.read())


def run_client(mode: str, n: int, url: str, base: str, a: argparse.Namespace, cpu: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--n", str(n), "--url", url,
           "--warmup", str(a.warmup), "--duration", str(a.duration)]
    if a.uvloop:
        cmd.append("--uvloop")
    s0 = _server_stats(base)
    pre = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    out = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre,
                         timeout=a.warmup + a.duration + 120, cwd=ROOT)
    s1 = _server_stats(base)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{mode} n={n} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    r = json.loads(line[7:])
    served = max(1, s1["requests"] - s0["requests"])
    r["server_cpu_us_per_req"] = (s1["cpu_s"] - s0["cpu_s"]) / served * 1e6
    r["server_rss_mb"] = s1.get("max_rss_mb")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="100,1000,5000", help="comma-separated in-flight levels")
    p.add_argument("--modes", default="engine,engine-aiohttp,aiohttp,openai,sequential")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before the window opens")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--repeat", type=int, default=1, help="runs per (mode, level), interleaved; the median is reported")
    p.add_argument("--url", help="an already running server's /v1 URL (default: start the fake server)")
    p.add_argument("--uvloop", action="store_true", help="clients use uvloop (must be installed)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--table", metavar="JSON", help="only print the tables of an earlier --json file")
    # worker-only flags
    p.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker_main(a)
        return
    if a.table:
        res = json.loads(Path(a.table).read_text())
        lv = sorted({int(k.split("@")[1]) for k in res if not k.startswith("sequential")})
        md = [m for m in MODES if any(k.startswith(m + "@") for k in res)]
        _table(res, lv, md)
        return

    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(ncpu))
    client_cpu, server_cpu = (cpus[0], cpus[-1]) if ncpu >= 2 else (None, None)
    levels = [int(x) for x in a.concurrency.split(",")]
    modes = [m.strip() for m in a.modes.split(",")]
    from simkit.loadtools.fakeserver import FakeConfig, start_fake_server

    print(f"# fake server: fixed {a.latency_ms:g} ms; server CPU {server_cpu}, client CPU {client_cpu}; "
          f"window {a.duration:g}s after {a.warmup:g}s warm-up", flush=True)
    results: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {}
    with start_fake_server(FakeConfig(latency_ms=a.latency_ms), cpus=[server_cpu] if server_cpu is not None else None) as srv:
        url, base = a.url or srv.url, srv.base_url
        if "sequential" in modes:
            results["sequential@1"] = run_client("sequential", 1, url, base, a, client_cpu)
            print(f"sequential@1: {results['sequential@1']['req_per_s']:.1f} req/s", flush=True)
        for n in levels:
            for rep in range(a.repeat):  # interleaved, so slow phases of a shared machine hit every mode
                for mode in modes:
                    if mode == "sequential":
                        continue
                    r = run_client(mode, n, url, base, a, client_cpu)
                    runs.setdefault(f"{mode}@{n}", []).append(r)
                    print(f"{mode}@{n} #{rep + 1}: {r['req_per_s']:.0f} req/s, client {r['cpu_us_per_req']:.0f} us/req "
                          f"(cpu {r['cpu_util']:.0%}), rss {r['rss_mb']:.0f} MB, server {r['server_cpu_us_per_req']:.0f} us/req",
                          flush=True)
    for key, rs in runs.items():  # the median run by request rate
        results[key] = {**sorted(rs, key=lambda r: r["req_per_s"])[len(rs) // 2], "runs": rs}
    print()
    _table(results, levels, modes)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


def _table(results: dict, levels: list[int], modes: list[str]) -> None:
    seq = results.get("sequential@1", {}).get("req_per_s")
    hdr = (f"{'in flight':>9} | {'mode':<14} | {'req/s':>8} | {'ep/s':>7} | {'client us/req':>13} | "
           f"{'client CPU':>10} | {'RSS MB':>7} | {'server us/req':>13} | {'engine / this':>13}")
    print(hdr)
    print("-" * len(hdr))

    def row(n: int, mode: str, r: dict, ratio: str) -> None:
        print(f"{n:>9} | {mode:<14} | {r['req_per_s']:>8.1f} | {r['episodes_per_s']:>7.1f} | "
              f"{r['cpu_us_per_req']:>13.0f} | {r['cpu_util']:>10.0%} | {r['rss_mb']:>7.0f} | "
              f"{r['server_cpu_us_per_req']:>13.0f} | {ratio:>13}")

    if seq:
        row(1, "sequential", results["sequential@1"], "")
    for n in levels:
        eng = results.get(f"engine@{n}", {}).get("req_per_s")
        for mode in modes:
            r = results.get(f"{mode}@{n}")
            if r is None or mode == "sequential":
                continue
            ratio = f"{eng / r['req_per_s']:.2f}x" if eng and mode != "engine" else ""
            if mode == "engine" and seq:
                ratio = f"{eng / seq:.0f}x seq"
            row(n, mode, r, ratio)
    print()
    for n in levels:  # the targets
        g = lambda m: results.get(f"{m}@{n}", {}).get("req_per_s")  # noqa: E731
        parts = []
        if g("engine") and g("aiohttp"):
            parts.append(f"engine/bare-aiohttp {g('engine') / g('aiohttp'):.2f}x" + (" (target >= 0.8x)" if n == 1000 else ""))
        if g("engine-aiohttp") and g("aiohttp"):
            parts.append(f"engine[aiohttp transport]/bare-aiohttp {g('engine-aiohttp') / g('aiohttp'):.2f}x")
        if g("engine") and g("openai"):
            parts.append(f"engine/openai-SDK {g('engine') / g('openai'):.1f}x" + (" (target >= 10x)" if n == 1000 else ""))
        if g("engine") and seq:
            parts.append(f"engine/sequential {g('engine') / seq:.0f}x")
        if results.get(f"engine@{n}"):
            parts.append(f"engine RSS {results[f'engine@{n}']['rss_mb']:.0f} MB" + (" (target < 1024 MB)" if n == 5000 else ""))
        if parts:
            print(f"@{n}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
