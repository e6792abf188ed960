"""`simkit` command line. Each subcommand lives in its own module, which exposes
`register_cli(subparsers)`; modules keep heavy imports (torch, transformers) inside functions
so `simkit --help` stays fast. Plug-ins (an env's own commands) add theirs through the
`simkit.commands` entry-point group: the core names no env."""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from simkit.config import dispatch  # noqa: F401  (trainer and env-server import it from config)

COMMANDS_GROUP = "simkit.commands"  # entry point -> register_cli(subparsers), e.g. ambigsql's `data`

# module -> registers one or more subcommands (order = order in --help)
COMMAND_MODULES = [
    "simkit.demo",
    "simkit.modelserver.server",
    "simkit.modelserver.tiny",
    "simkit.envserver.listing",
    "simkit.envserver.server",
    "simkit.act.pairs",
    "simkit.serving.cli",
    "simkit.evaluation.cli",
    "simkit.evaluation.compare",
    "simkit.evaluation.results",
    "simkit.evaluation.textclf",
    "simkit.loadtools.loadtest",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simkit",
        description="simkit: async clarify-or-answer simulation (ACT) — environments, rollouts, "
                    "preference-pair queue, evaluation and load testing. The trainer is `trainer`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `simkit COMMAND --help` for each command's options. Data: $SIMKIT_DATA_DIR.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and mod.startswith(e.name):  # module not written yet: skip it
                continue
            raise
        module.register_cli(sub)
    for ep in entry_points(group=COMMANDS_GROUP):
        _register_plugin(ep, sub)
    return p


def _register_plugin(ep, sub: argparse._SubParsersAction) -> None:
    """One plug-in's commands; a broken one is named on stderr and skipped, so the rest of the
    command line keeps working."""
    try:
        ep.load()(sub)
    except Exception as e:
        print(f"simkit: command plug-in {ep.name!r} ({ep.value}) failed to load, skipped: "
              f"{type(e).__name__}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return dispatch(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
