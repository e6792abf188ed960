"""`simkit serve`'s command: flags from `ServeConfig`, then one serve process or a `--workers` pool.

The command is its own module so that the wiring (`serving/serve.py`) and the pool
(`serving/workers.py`, whose workers run that wiring) need not import each other."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from simkit.serving.config import ServeConfig


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser(
        "serve", help="run ACT rollouts non-stop and stream scored pairs into the queue",
        description="ACT data side for any environment: builds Phase 1 pairs (D_pref) once, then refreshes them "
                    "with the current policy (Phase 2: sample, classify, simulate, score) and appends the pairs "
                    "to a durable queue for `trainer run`. Follows each policy version the trainer publishes. "
                    "Stops cleanly on SIGINT/SIGTERM and resumes from the run directory on restart. Flags "
                    "override values from --config YAML.")
    add_config_args(p, ServeConfig)
    p.set_defaults(func=_run, parser=p)


def _run(args: argparse.Namespace) -> int:
    from simkit.config import config_or_exit

    cfg = config_or_exit(ServeConfig, args, "serve")
    if not cfg.roles.policy.url:
        raise SystemExit("simkit serve: --policy URL is required (e.g. http://127.0.0.1:8000/v1)")
    if cfg.workers > 1:
        from simkit.serving.workers import WorkerPool

        pool = WorkerPool(cfg)
        code = pool.run()
        print(json.dumps(pool.snapshot()))
        return code
    from simkit.queue.outage import QueueUnavailable
    from simkit.serving.serve import serve

    try:
        summary = asyncio.run(serve(cfg))
    except QueueUnavailable as e:  # the outage outlasted --queue-outage-s: say what to do, no traceback
        print(f"simkit serve: stopped: {e}", file=sys.stderr, flush=True)
        return QueueUnavailable.exit_code
    print(json.dumps(summary))
    return 0
