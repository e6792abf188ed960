"""`simkit envs`: list registered environments and their split sizes."""
from __future__ import annotations

import argparse

from pydantic import BaseModel, Field


class EnvsConfig(BaseModel):
    """`simkit envs`: its one setting (a flag only: no `--config` file for a listing)."""

    data_dir: str | None = Field(None, description="task data folder (default: $SIMKIT_DATA_DIR or ../shared/data)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    p = sub.add_parser("envs", help="list registered environments and their split sizes",
                       description="List every registered environment with the number of tasks per split. "
                                   "Task data is read from $SIMKIT_DATA_DIR (or --data-dir).")
    add_config_args(p, EnvsConfig, config_flag=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from simkit.config import config_or_exit
    from simkit.env import make, registered

    data_dir = config_or_exit(EnvsConfig, args, "envs").data_dir
    for name in registered():
        try:
            env = make(name, **({"data_dir": data_dir} if data_dir else {}))
            sizes = ", ".join(f"{k}={v}" for k, v in env.splits().items())
        except Exception as e:  # data missing etc.: say what to do, keep listing
            sizes = f"unavailable ({type(e).__name__}: {e})"
        print(f"{name:10s} {sizes}")
    return 0
