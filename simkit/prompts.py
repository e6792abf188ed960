"""Prompt templates ship inside the package, as files beside this module (named by role,
optionally by task), so a wheel install has them (`[tool.setuptools.package-data]`).

`$name` placeholders (string.Template) so SQL, JSON and braces in data never clash.
Lookup order for `load("policy_system", env="pacific")`: simkit/prompts/pacific/policy_system.txt,
then simkit/prompts/policy_system.txt. SIMKIT_PROMPTS_DIR points elsewhere.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from string import Template

_DEFAULT_DIR = Path(__file__).resolve().parent


def prompts_dir() -> Path:
    return Path(os.environ.get("SIMKIT_PROMPTS_DIR", _DEFAULT_DIR))


@functools.lru_cache(maxsize=256)
def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip("\n")


def load(name: str, env: str | None = None) -> str:
    """The raw template text for `name` (task-specific version first)."""
    root = prompts_dir()
    candidates = ([root / env / f"{name}.txt"] if env else []) + [root / f"{name}.txt"]
    for path in candidates:
        if path.is_file():
            return _read(str(path))
    raise FileNotFoundError(
        f"prompt template {name!r} not found (looked in {', '.join(map(str, candidates))}); "
        "set SIMKIT_PROMPTS_DIR to a folder of templates, or reinstall simkit (they ship in the package)"
    )


def render(name: str, env: str | None = None, **values: object) -> str:
    return Template(load(name, env)).safe_substitute({k: str(v) for k, v in values.items()})
