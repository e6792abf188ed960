"""A built wheel works on its own: installed non-editable into a fresh venv, run from a
temporary folder (so the source tree is not importable), `simkit envs` lists the envs (found
through the wheel's entry points), the ambigsql `data` command is there, and an
episode runs with the LLM classifier and the LLM simulator, whose templates must come from the
installed package. No network: the wheel is built without isolation and the roles talk to
simkit's fake server on loopback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

EPISODE = r'''
import asyncio, json, sys
import simkit
from simkit import prompts
from simkit.loadtools.fakeserver import FakeServer

async def main():
    async with FakeServer(latency_ms=0, clarify_rate=1.0) as srv:
        clients = {r: simkit.RoleClient(r, base_urls=[srv.url], model=r) for r in ("policy", "simulator", "classifier")}
        env = simkit.make("toy", size=4, classifier=simkit.LLMClassifier(clients["classifier"]),
                          simulator=simkit.LLMSimulator(clients["simulator"]))
        task = next(t for t in env.tasks("train") if t.gold_action == "CLARIFY")
        traj = await simkit.run_episode(env, task, simkit.Policy(clients["policy"]))
        for c in clients.values():
            await c.aclose()
        print(json.dumps({"simkit": simkit.__file__, "prompts": str(prompts.prompts_dir()),
                          "status": traj.status, "error": traj.error, "roles": [t.role for t in traj.turns],
                          "actions": [t.action for t in traj.turns],
                          "requests": {r: c.stats.successes for r, c in clients.items()}}))

asyncio.run(main())
'''


def _run(cmd, cwd, env, timeout=300):
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
    return res.stdout


def _check_wheel_contents(wheel: Path) -> None:
    """The templates ride inside simkit's namespace (mapped from the top-level prompts/ at build
    time), never as a top-level `prompts` package that could clash with another distribution's;
    the envs and the ambigsql commands are declared as entry points, the only way the core finds them."""
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for template in ("shared/policy/system.txt", "shared/simulator/reply.txt", "shared/classifier/fewshot.txt",
                     "shared/loser_generator/shot.txt", "ambigsql/policy/user_prompt.txt", "pacific/policy/system.txt"):
        assert f"simkit/_prompts/{template}" in names, template
    assert not [n for n in names if n.startswith("prompts/")], "a top-level prompts/ in the wheel"
    assert "simkit/prompts.py" in names
    assert "[simkit.environments]" in entry_points and "toy = environments.toy:ToyEnv" in entry_points
    assert "[simkit.commands]" in entry_points and "ambigsql = environments.ambigsql.cli:register_cli" in entry_points


def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path):
    import json

    src = tmp_path / "src"  # build from a copy: the checkout gets no build/ or egg-info
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "dist", "*.egg-info",
                                                             "__pycache__", "tests", "docs", "bench"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "SIMKIT_PROMPTS_DIR")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp_path / "dist"), str(src)], cwd=tmp_path, env=env)
    (wheel,) = (tmp_path / "dist").glob("simkit-*.whl")
    _check_wheel_contents(wheel)

    fresh = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(fresh)
    py = fresh / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp_path, env=env).strip())
    # simkit's dependencies come from this interpreter's site-packages, as a plain path: a .pth
    # line adds the folder but runs none of its .pth files, so an editable simkit there stays out
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)],
         cwd=tmp_path, env=env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    out = _run([str(fresh / "bin" / "simkit"), "envs"], cwd=work, env=env)
    assert "toy" in out and "ambigsql" in out
    out = _run([str(fresh / "bin" / "simkit"), "data", "build-ambigsql", "--help"], cwd=work, env=env)
    assert "--spider" in out  # a command from the `simkit.commands` entry point

    (work / "episode.py").write_text(EPISODE)
    r = json.loads(_run([str(py), "episode.py"], cwd=work, env=env).strip().splitlines()[-1])
    assert Path(r["simkit"]).is_relative_to(fresh), r["simkit"]
    prompts_dir = Path(r["prompts"])
    assert prompts_dir.is_relative_to(fresh) and prompts_dir.parts[-2:] == ("simkit", "_prompts"), prompts_dir
    assert (prompts_dir / "shared" / "simulator" / "reply.txt").is_file()
    assert r["status"] == "ok", r["error"]
    assert r["roles"] == ["assistant", "user", "assistant"] and r["actions"][0] == "CLARIFY"
    assert r["requests"]["classifier"] == 2 and r["requests"]["simulator"] == 2  # intent summary + reply
