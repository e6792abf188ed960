"""The engine bench before and after a refactor, in the same run (issue 25: the wings move must not
cost engine speed).

    python bench/bench_floorplan.py --before 6156bab --repeats 3

Checks out REF into a temporary git worktree, then alternates `bench/bench_engine.py --modes engine`
from that tree and from this one (PYTHONPATH points at the tree under test), both against one fake
server, and prints the median episodes/s of each and after/before. This machine's run-to-run noise
is about ±15%: use 5 or more repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(tree: Path, concurrency: int, duration: float, out: Path, url: str) -> float:
    """Episodes/s of the engine mode, measured by the tree's own bench_engine.py against `url`."""
    cmd = [sys.executable, str(tree / "bench" / "bench_engine.py"), "--modes", "engine", "--concurrency",
           str(concurrency), "--duration", str(duration), "--warmup", "2", "--repeat", "1", "--json", str(out),
           "--url", url]
    subprocess.run(cmd, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True,
                   capture_output=True, text=True)
    return float(json.loads(out.read_text())[f"engine@{concurrency}"]["episodes_per_s"])


def _alternate(before: Path, a: argparse.Namespace, tmp: Path) -> dict[str, list[float]]:
    """Both trees' clients against one fake server (this tree's, pinned to the last CPU): only the
    client side, where the engine runs, differs between the runs."""
    from simkit.loadtools.fakeserver import FakeConfig, start_fake_server

    rates: dict[str, list[float]] = {"before": [], "after": []}
    with start_fake_server(FakeConfig(latency_ms=50), cpus=[os.cpu_count() - 1]) as srv:
        for i in range(a.repeats):
            for name, tree in (("before", before), ("after", ROOT)):
                rates[name].append(run_bench(tree, a.concurrency, a.duration, tmp / f"{name}{i}.json", srv.url))
                print(f"run {i + 1} {name}: {rates[name][-1]:.0f} episodes/s", flush=True)
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git ref of the layout before the move")
    ap.add_argument("--repeats", type=int, default=5, help="alternated runs per tree (median reported)")
    ap.add_argument("--concurrency", type=int, default=1000, help="episodes in flight")
    ap.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", str(before), a.before], cwd=ROOT, check=True,
                       capture_output=True)
        # the old tree found its envs by module name and then loaded the installed entry points, which now
        # name the new tree's env classes: keep the old tree to its own envs (discovery only, not speed)
        env_py = before / "simkit" / "env.py"
        env_py.write_text(env_py.read_text().replace('group="simkit.environments"', 'group="simkit.environments.old"'))
        try:
            rates = _alternate(before, a, Path(tmp))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    b, after = statistics.median(rates["before"]), statistics.median(rates["after"])
    print(f"\nengine, {a.concurrency} in flight: before ({a.before}) {b:.0f} ep/s, after {after:.0f} ep/s, "
          f"after/before {after / b:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
