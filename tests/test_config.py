"""One config system: flags generated from pydantic models (nested roles included), YAML nested or
in the older flat spelling, flags over YAML, one default per setting, errors that name the flag."""
import argparse

import pytest

from simkit.roles.client import ClientSettings, RoleConfig
from simkit.config import add_config_args, config_from_args
from simkit.loadtools.loadtest import LoadConfig
from simkit.loadtools.loadtest import config_from_args as load_config_from_args
from simkit.roles.build import RolesConfig, add_role_args, build_roles
from simkit.serving.serve import ServeConfig


def _parse(cls, argv):
    p = argparse.ArgumentParser()
    add_config_args(p, cls)
    return p, p.parse_args(argv)


def test_serve_yaml_nested_or_flat_and_flags_win(tmp_path):
    nested = tmp_path / "nested.yaml"
    nested.write_text("env: toy\nqueue: q.db\nroles:\n  policy: {url: 'http://a/v1,http://b/v1', model: m}\n"
                      "  client: {timeout_s: 42}\n")
    _, args = _parse(ServeConfig, ["--config", str(nested), "--max-retries", "7", "--n", "5"])
    cfg = config_from_args(ServeConfig, args)
    assert cfg.roles.policy.url == ["http://a/v1", "http://b/v1"] and cfg.roles.policy.model == "m"
    assert cfg.roles.client.timeout_s == 42 and cfg.roles.client.max_retries == 7 and cfg.n_conversations == 5

    flat = tmp_path / "flat.yaml"  # the older spelling: flag names at the top level
    flat.write_text("env: toy\nqueue: q.db\npolicy: [http://a/v1]\ntimeout: 9\nclassifier: http://c/v1\nlimit: 3\n")
    _, args = _parse(ServeConfig, ["--config", str(flat), "--timeout", "11"])
    cfg = config_from_args(ServeConfig, args)
    assert cfg.roles.policy.url == ["http://a/v1"] and cfg.roles.classifier.url == "http://c/v1"
    assert cfg.roles.client.timeout_s == 11 and cfg.n_conversations == 3


def test_unknown_keys_and_bad_values_name_the_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: toy\nqueue: q.db\nconcurency: 3\n")
    _, args = _parse(ServeConfig, ["--config", str(bad)])
    with pytest.raises(ValueError, match="concurency"):
        config_from_args(ServeConfig, args)
    _, args = _parse(ServeConfig, ["--env", "toy", "--queue", "q", "--timeout", "-1"])
    with pytest.raises(ValueError, match="--timeout"):
        config_from_args(ServeConfig, args)


def test_one_default_per_setting():
    client = ClientSettings()
    assert RoleConfig().timeout_s == RolesConfig().client.timeout_s == LoadConfig().timeout == client.timeout_s
    assert RoleConfig().max_retries == LoadConfig().max_retries == client.max_retries
    assert RoleConfig().transport == LoadConfig().transport == "fast"


def test_role_flags_build_the_roles():
    p = argparse.ArgumentParser()
    add_role_args(p)
    args = p.parse_args(["--policy", "http://127.0.0.1:9/v1", "--classifier", "http://127.0.0.1:9/v1",
                         "--classifier-model", "judge", "--timeout", "5", "--model", "pol"])
    roles = build_roles(args, "toy")
    by_role = {c.role: c for c in roles.clients}
    assert set(by_role) == {"policy", "classifier"}  # the simulator defaults to the offline one
    assert by_role["classifier"].model == "judge" and by_role["policy"].model == "pol"
    assert all(c.config.timeout_s == 5 for c in roles.clients)
    assert by_role["policy"].config.sampling == {"temperature": 0.7, "max_tokens": 256}


def test_loadtest_flags_are_generated_with_their_short_names():
    from simkit.cli import build_parser

    args = build_parser().parse_args(["loadtest", "-c", "7", "-n", "0", "-d", "2", "--fake-latency-ms", "3",
                                      "--fake-cpus", "1,2", "--no-plot"])
    cfg = load_config_from_args(args)
    assert cfg.concurrency == 7 and cfg.episodes is None and cfg.duration == 2 and cfg.plot is False
    assert cfg.fake == {"latency_ms": 3.0} and cfg.fake_cpus == [1, 2]


def test_positional_and_repeatable_fields():
    """`{"positional": True}` and `{"repeatable": True}`: `simkit compare RUN... --group A --group B`."""
    import argparse

    from pydantic import BaseModel, Field

    from simkit.config import add_config_args, config_from_args

    class Cmd(BaseModel):
        runs: list[str] = Field(default_factory=list, json_schema_extra={"positional": True})
        target: str = Field(..., json_schema_extra={"positional": True})
        group: list[str] = Field(default_factory=list, json_schema_extra={"repeatable": True})

    p = argparse.ArgumentParser()
    add_config_args(p, Cmd, config_flag=False)
    cfg = config_from_args(Cmd, p.parse_args(["T", "r1", "r2", "--group", "a=1", "--group", "b=2"]))
    assert cfg.target == "T" and cfg.runs == ["r1", "r2"] and cfg.group == ["a=1", "b=2"]
    assert config_from_args(Cmd, p.parse_args(["T"])).runs == []
