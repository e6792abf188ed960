"""One dev experiment on what action pairs teach, end to end and logged (bench/RESULTS.md, "When to
ask, dev"): Phase 1 pairs (`simkit pairs build ... --out SRC.jsonl`) -> a balanced selection in a
SQLite queue, E shuffled passes -> `trainer run` offline from the base -> the first-token "when"
numbers on dev turns (bench/action_first_token.py). Rerunning resumes: a filled queue, a trained
adapter and a finished measurement are kept.

    python bench/dev_action_experiment.py NAME --pairs SRC.jsonl [--epochs E] [--seed S] [--turn1]
        [--unbalanced] [--q-losers] [--n-dev 150] [--runs-dir runs/dev] -- TRAINER RUN FLAGS...

e.g. `... k1q --pairs runs/dev/pairs-n100/dpref.jsonl --q-losers --epochs 2 -- --action-tokens 1 --beta 0.1`.
Selection: every gold-CLARIFY turn-0 pair and as many gold-ANSWER turn-0 pairs (seeded), unless
--unbalanced; --turn1 adds the turn after each clarification; --q-losers keeps only gold-ANSWER
pairs whose losing question opens with a question word (a generator's "The ..." or "User: ..."
loser teaches "not that word", not "do not ask").
"""
import argparse
import json
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("name")
ap.add_argument("--pairs", required=True)
ap.add_argument("--epochs", type=int, default=1)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--turn1", action="store_true", help="keep the turn-after-clarification pairs")
ap.add_argument("--unbalanced", action="store_true", help="all gold-ANSWER pairs, not as many as gold-CLARIFY")
ap.add_argument("--q-losers", action="store_true", help="only gold-ANSWER pairs whose loser opens with a question word")
ap.add_argument("--n-dev", type=int, default=150)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--runs-dir", default="runs/dev", help="experiment directories go here (default runs/dev)")
ap.add_argument("--model", default="runs/models/smollm2")
argv = sys.argv[1:]
cut = argv.index("--") if "--" in argv else len(argv)
a = ap.parse_args(argv[:cut])
rest = argv[cut + 1:]
REPO = Path(__file__).resolve().parents[1]
root = (Path(a.runs_dir) if Path(a.runs_dir).is_absolute() else REPO / a.runs_dir) / a.name
root.mkdir(parents=True, exist_ok=True)
log = open(root / "exp.log", "a")


def say(msg):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


def run(cmd, out):
    say("$ " + shlex.join(cmd))
    t0 = time.time()
    with open(out, "a") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    say(f"rc={rc} in {time.time() - t0:.0f}s")
    if rc:
        sys.exit(rc)


sys.path.insert(0, str(REPO))
from simkit.queue import open_queue  # noqa: E402
from simkit.types import PreferencePair  # noqa: E402

pairs = [PreferencePair.model_validate_json(l) for l in open(a.pairs) if l.strip()]
rng = random.Random(a.seed)
clar = [p for p in pairs if p.gold_action == "CLARIFY" and p.turn == 0]
ans = [p for p in pairs if p.gold_action == "ANSWER" and (p.turn == 0 or a.turn1)]
QW = ("Which", "What", "Do", "Could", "How", "Are", "Is", "Did", "Would", "Can", "Should", "When", "Where", "Who")


def opener(p):
    side = p.rejected
    text = side[0].content if isinstance(side, list) else side
    return text.strip().split(" ")[0].strip("?,.:")


if a.q_losers:
    ans = [p for p in ans if opener(p) in QW]
if not a.unbalanced:
    ans = rng.sample(ans, min(len(ans), len(clar)))
chosen = clar + ans
if not (root / "queue.sqlite").exists():
    out = []
    for e in range(a.epochs):
        ep = [p.model_copy(update={"id": f"{p.id}-e{e}"}) for p in chosen]
        rng.shuffle(ep)
        out += ep
    open_queue(str(root / "queue.sqlite")).append(out)
    say(f"queue: {len(clar)} CLARIFY + {len(ans)} ANSWER pairs x {a.epochs} epochs = {len(out)}")
steps = (len(chosen) * a.epochs) // a.batch_size


def trained() -> list[Path]:
    """The published versions, else (the queue drained before --max-steps) the checkpoints, oldest first."""
    return sorted((root / "train" / "adapters").glob("*/v*")) or sorted(
        (root / "train" / "checkpoints").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))


if not trained():
    run([sys.executable, "-m", "trainer.cli", "run", "--model", a.model, "--queue", str(root / "queue.sqlite"),
         "--out", str(root / "train"), "--adapter-name", a.name, "--max-steps", str(steps), "--publish-every",
         str(steps), "--idle-timeout-s", "20", "--seed", str(a.seed), "--no-tensorboard", "--batch-size",
         str(a.batch_size), *rest], root / "train.log")
ad = trained()[-1]
say(f"adapter {ad}")
run([sys.executable, "bench/action_first_token.py", "--model", a.model, "--adapter",
     f"{a.name}={ad}", "--skip-base", "--split", "dev", "--limit", str(a.n_dev), "--seed", "0", "--json",
     str(root / "first_token.json")], root / "first_token.log")
res = json.load(open(root / "first_token.json"))[a.name]
say(f"RESULT {a.name}: " + json.dumps(res))
