"""`simkit envs`: list registered environments and their split sizes."""
from __future__ import annotations

import argparse


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("envs", help="list registered environments and their split sizes",
                       description="List every registered environment with the number of tasks per split. "
                                   "Task data is read from $SIMKIT_DATA_DIR (or --data-dir).")
    p.add_argument("--data-dir", help="task data folder (default: $SIMKIT_DATA_DIR or ../shared/data)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simkit.env import make, registered

    for name in registered():
        try:
            env = make(name, **({"data_dir": args.data_dir} if args.data_dir else {}))
            sizes = ", ".join(f"{k}={v}" for k, v in env.splits().items())
        except Exception as e:  # data missing etc.: say what to do, keep listing
            sizes = f"unavailable ({type(e).__name__}: {e})"
        print(f"{name:10s} {sizes}")
    return 0
