"""Prompt templates: one folder per env and role, the env's version first, found from a
checkout, from $SIMKIT_PROMPTS_DIR, or (tests/test_wheel.py) from an installed wheel."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from simkit import prompts

REPO = Path(__file__).resolve().parent.parent
ROLES = {"policy", "simulator", "classifier", "loser_generator", "build"}


def test_checkout_uses_the_top_level_folder(monkeypatch):
    monkeypatch.delenv("SIMKIT_PROMPTS_DIR", raising=False)
    assert prompts.prompts_dir() == REPO / "prompts"
    assert not (REPO / "simkit" / "prompts").exists()  # the loader is simkit/prompts.py, not a package


def test_layout_is_scope_role_name():
    files = sorted((REPO / "prompts").rglob("*.txt"))
    assert files
    for f in files:
        scope, role, _ = f.relative_to(REPO / "prompts").parts
        assert role in ROLES, f
        assert scope == "shared" or (REPO / "environments" / scope).is_dir(), f


def test_env_version_first_then_shared():
    assert prompts.load("policy/system", env="pacific") == (REPO / "prompts/pacific/policy/system.txt").read_text().strip("\n")
    assert prompts.load("policy/system", env="toy") == (REPO / "prompts/shared/policy/system.txt").read_text().strip("\n")
    assert prompts.load("simulator/reply", env="ambigsql") == prompts.load("simulator/reply")
    text = prompts.render("policy/user_prompt", env="ambigsql", schema="CREATE TABLE t(a)", question="How many?")
    assert "CREATE TABLE t(a)" in text and "How many?" in text and "$" not in text


def test_missing_template_says_where_it_looked_and_the_name_form():
    with pytest.raises(FileNotFoundError, match=r"'policy_system' not found \(names are '<role>/<name>'"):
        prompts.load("policy_system", env="pacific")
    with pytest.raises(FileNotFoundError, match=re.escape(str(Path("pacific", "policy", "nope.txt")))):
        prompts.load("policy/nope", env="pacific")


def test_env_var_points_elsewhere(monkeypatch, tmp_path):
    (tmp_path / "shared" / "policy").mkdir(parents=True)
    (tmp_path / "shared" / "policy" / "system.txt").write_text("Be brief about $topic.\n")
    monkeypatch.setenv("SIMKIT_PROMPTS_DIR", str(tmp_path))
    assert prompts.render("policy/system", env="pacific", topic="tables") == "Be brief about tables."


def test_every_name_in_the_code_exists():
    """Each literal name passed to prompts.load/render (or the roles' _render) has a shared file
    or, for env-only ones, an env file."""
    pattern = re.compile(r"""(?:prompts\.(?:load|render)|_render)\((?:self\._templates, )?["']([a-z_]+/[a-z_]+)["']""")
    names = set()
    for folder in ("simkit", "environments", "bench"):
        for f in (REPO / folder).rglob("*.py"):
            names |= set(pattern.findall(f.read_text()))
    assert {"policy/system", "classifier/fewshot", "simulator/reply", "loser_generator/shot"} <= names
    for name in names:
        assert list((REPO / "prompts").glob(f"*/{name}.txt")), name
