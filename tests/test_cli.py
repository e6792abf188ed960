"""Every command is reachable and its --help is complete (real subprocesses, installed scripts)."""
import argparse
import subprocess
import sys

import pytest

COMMANDS = ["demo", "model-server", "model", "envs", "data", "pairs", "serve", "eval", "eval-classifier", "compare",
            "loadtest"]


def _help(*args):
    res = subprocess.run([sys.executable, "-m", "simkit.cli", *args, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_top_level_help_lists_every_command():
    out = _help()
    for c in COMMANDS:
        assert f"    {c}" in out, c


@pytest.mark.parametrize("args,must", [
    (["model-server"], ["--model", "--port", "--served-model-name", "--max-batch", "load_lora_adapter", "--api-key"]),
    (["model", "init-tiny"], ["--out", "--seed", "--corpus"]),
    (["serve"], ["--env", "--queue", "--policy", "redis://", "--max-pending", "--ablation", "--config",
                 "--sync", "--pseudo-label", "--n-conversations", "--mode", "--clarify-rounds", "error if N exceeds"]),
    (["pairs", "build"], ["--pseudo-label", "--out", "--policy", "--classifier", "--n-conversations", "dialogues"]),
    (["eval"], ["--icl-shots", "--icl-select", "--split", "--out", "--api-key-env", "--n-tasks",
                "--train-conversations", "--clarify-rounds", "0: greedy", "default: 128"]),
    (["eval-classifier"], ["--env", "--classifier", "--split"]),
    (["data", "build-ambigsql"], ["--spider", "--out", "--seed"]),
    (["loadtest"], ["--concurrency"]),
    (["demo"], ["--model", "--policy", "--out"]),
])
def test_subcommand_help_is_complete(args, must):
    out = _help(*args)
    for flag in must:
        assert flag in out, (args, flag)


def _walk(parser, path=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, path + (name,))
        else:
            yield path, action


def test_every_option_of_every_command_has_help():
    from simkit.cli import build_parser
    from trainer.cli import build_parser as trainer_parser

    missing = [(path, a.dest) for parser in (build_parser(), trainer_parser()) for path, a in _walk(parser)
               if not a.help]
    assert not missing, missing


def test_trainer_help():
    res = subprocess.run([sys.executable, "-m", "trainer.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and all(c in res.stdout for c in ("run", "sft", "plot"))
    for cmd, flags in ((["run"], ["--sync", "--rpo-alpha", "--max-staleness"]),
                       (["sft"], ["--n-conversations", "--sample-seed"])):
        res = subprocess.run([sys.executable, "-m", "trainer.cli", *cmd, "--help"], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0 and all(f in res.stdout for f in flags), (cmd, res.stdout[-500:])


def test_clear_error_for_unknown_env():
    res = subprocess.run([sys.executable, "-m", "simkit.cli", "eval", "--env", "nope", "--out", "/tmp/x",
                          "--policy", "http://127.0.0.1:9/v1"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "no environment named 'nope'" in res.stderr
