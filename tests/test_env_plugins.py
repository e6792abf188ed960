"""Envs and extra commands are plug-ins found only through entry points: the core names none,
a plug-in that is not `@register`ed still works, and a broken one is named when asked for
without hiding the others."""
from __future__ import annotations

import argparse
import ast
import re
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

import simkit
import simkit.cli
import simkit.env
from simkit.envserver import listing

REPO = Path(__file__).resolve().parent.parent


def _with(monkeypatch, module, group: str, *extra: EntryPoint) -> None:
    """`module.entry_points` answers the installed entry points plus `extra`."""
    real = module.entry_points
    monkeypatch.setattr(module, "entry_points", lambda group=group: [*real(group=group), *extra])


def _code_strings(path: Path) -> list[str]:
    """String constants and imported module names of a file, docstrings and comments left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    out = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
           and id(n) not in docs]
    out += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    return out + [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]


def test_the_core_names_no_env():
    for path in ("simkit/env.py", "simkit/cli.py"):
        named = [s for s in _code_strings(REPO / path)
                 if re.search(r"\benvironments\.\w|\{\w+\}env\b|\b(toy|ambigsql|pacific|abgcoqa)\b", s)]
        assert not named, (path, named)
    assert not hasattr(simkit.env, "BUILTIN_PLUGINS")


def test_installed_envs_are_listed_from_entry_points():
    names = {ep.name for ep in simkit.env.entry_points(group=simkit.env.ENV_GROUP)}
    assert {"toy", "ambigsql", "pacific", "abgcoqa"} <= names  # pyproject.toml; `pip install -e .` writes them
    assert {"toy", "ambigsql", "pacific", "abgcoqa"} <= set(simkit.registered())


def test_broken_plugin_is_named_and_does_not_hide_the_others(monkeypatch, capsys):
    broken = EntryPoint(name="broken", value="no_such_simkit_plugin.env:BrokenEnv", group=simkit.env.ENV_GROUP)
    _with(monkeypatch, simkit.env, simkit.env.ENV_GROUP, broken)
    assert {"broken", "toy"} <= set(simkit.registered())  # listing imports no plug-in
    with pytest.raises(simkit.env.EnvPluginError, match=r"plug-in 'broken' \(no_such_simkit_plugin\.env:BrokenEnv"):
        simkit.make("broken")
    assert simkit.make("toy", size=4).splits() == {"train": 4, "test": 1}
    listing.run(argparse.Namespace(data_dir=None))
    out = capsys.readouterr().out
    assert re.search(r"^broken\s+unavailable \(EnvPluginError: .*'broken'", out, re.M), out
    assert re.search(r"^toy\s+train=200, test=50$", out, re.M), out


def test_plugin_without_register_gets_its_entry_point_name(monkeypatch, tmp_path):
    (tmp_path / "my_simkit_plugin.py").write_text(textwrap.dedent('''
        from simkit.env import Env
        from simkit.types import ANSWER, Message, Task

        class MyEnv(Env):
            loads = 0

            def load_splits(self):
                type(self).loads += 1
                return {"only": (Task(id="t0", env="mine", prompt=[Message(role="user", content="hi")],
                                      gold_action=ANSWER, reference="hello", goal="hello"),)}

            async def score(self, prediction, target, task):
                return float(prediction == target)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(simkit.env, "_REGISTRY", dict(simkit.env._REGISTRY))
    _with(monkeypatch, simkit.env, simkit.env.ENV_GROUP,
          EntryPoint(name="mine", value="my_simkit_plugin:MyEnv", group=simkit.env.ENV_GROUP))
    env = simkit.make("mine")
    assert env.name == "mine" and "mine" in simkit.registered()
    assert env.splits() == {"only": 1} and isinstance(env.tasks("only"), list) and env.tasks("only")[0].id == "t0"
    assert env.tasks("only") is env.tasks("only") and type(env).loads == 1  # loaded once, on first use
    with pytest.raises(KeyError, match=r"mine has splits \['only'\], not 'other'"):
        env.tasks("other")


def test_commands_come_from_entry_points_and_a_broken_one_is_skipped(monkeypatch, capsys):
    parser = simkit.cli.build_parser()
    assert "data" in parser._subparsers._group_actions[0].choices  # ambigsql's, via simkit.commands
    broken = EntryPoint(name="bad", value="no_such_simkit_plugin.cli:register_cli", group=simkit.cli.COMMANDS_GROUP)
    _with(monkeypatch, simkit.cli, simkit.cli.COMMANDS_GROUP, broken)
    parser = simkit.cli.build_parser()
    assert {"envs", "data"} <= set(parser._subparsers._group_actions[0].choices)
    assert "command plug-in 'bad' (no_such_simkit_plugin.cli:register_cli) failed to load" in capsys.readouterr().err
