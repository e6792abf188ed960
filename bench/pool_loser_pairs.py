"""Phase 1 action pairs from the data alone (issue 20, dev): the authors' contrast with every
ANSWER-turn loser taken from the generator's own fallback, a seeded reference clarifying question of
another training conversation (`LoserGenerator.pool_question`), so no model is called.

    python bench/pool_loser_pairs.py --n 250 --seed 0 --out runs/dev/pool-n250-s0/dpref.jsonl

Why: a first-token loss (`trainer run --action-tokens 1`) sees only each side's first token, so a
pool question is as good a loser there as a generated one, and n = 250-500 conversations of pairs
cost seconds instead of the ~40 minutes the few-shot generator takes on 2 cores. Runs the real
`build_pairs` (simkit/act/pairs.py) over the same n-conversation sample `trainer sft` and
`pairs build` draw.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simkit.act.pairs import build_pairs, new_phase1_stats  # noqa: E402
from simkit.env import make  # noqa: E402
from simkit.roles.agents import LoserGenerator, RuleClassifier  # noqa: E402
from simkit.sampling import sample_conversations  # noqa: E402
from simkit.types import Reply  # noqa: E402


class NoQuestion:
    """A generator backend that never writes a question: every loser is the pool fallback."""

    model = None

    async def respond(self, messages, instruction=None, task=None, **kw) -> Reply:
        return Reply(text="")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="training conversations")
    ap.add_argument("--seed", type=int, default=0, help="conversation-sample seed")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    env = make("ambigsql")
    sample = sample_conversations(env.tasks("train"), a.n, a.seed, env="ambigsql", split="train")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sample.write(a.out.with_name(a.out.stem + ".conversations.json"))
    backend, stats = NoQuestion(), new_phase1_stats()
    generator = LoserGenerator(backend, sample.tasks, env="ambigsql", seed=a.seed)
    pairs, failures = asyncio.run(build_pairs(env, sample.tasks, backend, a.out, classifier=RuleClassifier(),
                                              stats=stats, contrast="authors", generator=generator, seed=a.seed))
    print(json.dumps({"conversations": len(sample.conversation_ids), "new_pairs": len(pairs), "failures": failures,
                      "phase1": stats, "out": str(a.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
