"""Why a setup.py: the wheel ships the top-level prompts/ folder as `simkit._prompts`
(`[tool.setuptools.package-dir]` in pyproject.toml), a package that `packages.find` cannot see,
and pyproject.toml cannot combine a found package list with an extra named one. All other
metadata is in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["simkit*", "trainer*", "environments*"]) + ["simkit._prompts"])
