"""Prompt templates: text files kept out of the code, one per role and name, optionally per env.

Why files: prompts are edited and reviewed as text, and one env can change a role's wording
without touching the others. They live in the repository's top-level `prompts/` folder:

    prompts/shared/<role>/<name>.txt       every env (roles: policy, simulator, classifier, loser_generator)
    prompts/<env>/<role>/<name>.txt        one env's version, which wins over the shared one

`load("policy/system", env="pacific")` reads prompts/pacific/policy/system.txt, else
prompts/shared/policy/system.txt. `$name` placeholders (string.Template) so SQL, JSON and braces
in data never clash. The folder is found as: $SIMKIT_PROMPTS_DIR; else the checkout's `prompts/`
(source or editable install); else the copy a wheel ships as `simkit/_prompts/` (the build maps
`prompts/` there: `[tool.setuptools.package-dir]` in pyproject.toml).
"""
from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path
from string import Template

SHARED = "shared"
_CHECKOUT = Path(__file__).resolve().parents[1]  # the repository root when running from source


def prompts_dir() -> Path:
    """The template folder in use (see the module docstring for the order)."""
    return _folder(os.environ.get("SIMKIT_PROMPTS_DIR") or None)


@functools.lru_cache(maxsize=8)
def _folder(override: str | None) -> Path:
    if override:
        return Path(override)
    if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "prompts" / SHARED).is_dir():
        return _CHECKOUT / "prompts"
    return Path(str(resources.files("simkit") / "_prompts"))


@functools.lru_cache(maxsize=256)
def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8").strip("\n")


def load(name: str, env: str | None = None) -> str:
    """The raw template text for `name` ("<role>/<name>"), the env's own version first."""
    return _load(name, env, prompts_dir())


@functools.lru_cache(maxsize=256)
def _load(name: str, env: str | None, root: Path) -> str:
    """Cached per (name, env, folder): a render runs on every role request, so no file-system
    lookups on that path (an edited template is read by a new process)."""
    candidates = ([root / env / f"{name}.txt"] if env else []) + [root / SHARED / f"{name}.txt"]
    for path in candidates:
        if path.is_file():
            return _read(str(path))
    hint = "" if "/" in name else " (names are '<role>/<name>', e.g. 'policy/system')"
    raise FileNotFoundError(
        f"prompt template {name!r} not found{hint} (looked in {', '.join(map(str, candidates))}); "
        "set SIMKIT_PROMPTS_DIR to a folder of templates, or reinstall simkit (they ship in the package)"
    )


def render(name: str, env: str | None = None, **values: object) -> str:
    return Template(load(name, env)).safe_substitute({k: str(v) for k, v in values.items()})
