"""The three roles (policy, simulator, classifier): their config and how they are built.

One nested config (`RolesConfig`) shared by `pairs build`, `serve`, `eval` and `loadtest`, so
every command takes the same flags (generated from it by `simkit.config`) and YAML keys:

    roles:
      policy: {url: [http://127.0.0.1:8000/v1], model: policy-v3, temperature: 0.7}
      simulator: {url: grounded}           # offline: replays the dataset's clarification
      classifier: {url: http://127.0.0.1:8001/v1, model: judge}
      client: {timeout_s: 600, max_retries: 3, transport: fast}

`grounded` and `rule` are the offline simulator and classifier; a URL (or several,
comma-separated) selects the LLM implementation over that OpenAI-compatible server.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field, field_validator

from simkit.roles.agents import GroundedSimulator, LLMClassifier, LLMSimulator, Policy, RuleClassifier
from simkit.roles.client import ClientSettings, RoleClient, RoleConfig
from simkit.roles.transport import ChatTransport, make_transport


def _urls(v: Any) -> Any:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c']."""
    if v is None:
        return []
    items = [v] if isinstance(v, str) else list(v)
    return [u.strip() for item in items for u in str(item).split(",") if u.strip()]


class PolicyRole(BaseModel):
    """Policy role (the model being trained)."""

    model_config = ConfigDict(extra="forbid")

    url: list[str] = Field(default_factory=list, json_schema_extra={"flags": ["--policy"], "metavar": "URL"},
                           description="policy base URL(s), e.g. http://127.0.0.1:8000/v1; several (or "
                                       "comma-separated) are load-balanced")
    model: str | None = Field(None, json_schema_extra={"flags": ["--policy-model", "--model"]},
                              description="policy model or adapter name (default: the server's first model)")
    temperature: float = Field(0.7, ge=0, json_schema_extra={"flags": ["--temperature"]},
                               description="policy sampling temperature")
    max_tokens: int = Field(256, ge=1, json_schema_extra={"flags": ["--max-tokens"]},
                            description="policy max completion tokens")

    @field_validator("url", mode="before")
    @classmethod
    def _split(cls, v: Any) -> list[str]:
        return _urls(v)


class SimulatorRole(BaseModel):
    """User simulator role."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("grounded", json_schema_extra={"flags": ["--simulator"], "metavar": "grounded|URL"},
                     description="'grounded' replays the dataset's answer (offline), or an LLM URL (comma-separated "
                                 "for several)")
    model: str | None = Field(None, json_schema_extra={"flags": ["--simulator-model"]},
                              description="simulator model name (default: the server's first model)")

    @property
    def offline(self) -> bool:
        return self.url == "grounded"


class ClassifierRole(BaseModel):
    """Action classifier role."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("rule", json_schema_extra={"flags": ["--classifier"], "metavar": "rule|URL"},
                     description="'rule' (offline heuristics) or an LLM URL (the authors' few-shot Yes/No)")
    model: str | None = Field(None, json_schema_extra={"flags": ["--classifier-model"]},
                              description="classifier model name (default: the server's first model)")

    @property
    def offline(self) -> bool:
        return self.url == "rule"


class RolesConfig(BaseModel):
    """The three roles and the client settings they share."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyRole = Field(default_factory=PolicyRole)
    simulator: SimulatorRole = Field(default_factory=SimulatorRole)
    classifier: ClassifierRole = Field(default_factory=ClassifierRole)
    client: ClientSettings = Field(default_factory=ClientSettings)


def add_role_args(p: argparse.ArgumentParser, policy_required: bool = True) -> None:
    """The role flags, generated from `RolesConfig`. `policy_required=False` leaves the check to
    the command (a YAML config may supply the URL)."""
    from simkit.config import add_config_args

    add_config_args(p, RolesConfig, config_flag=False)
    if policy_required:
        next(a for a in p._actions if a.dest == "policy").required = True


def roles_config(args: argparse.Namespace | RolesConfig | None) -> RolesConfig:
    """A `RolesConfig` from parsed flags (or the config itself)."""
    if isinstance(args, RolesConfig):
        return args
    if args is None:
        return RolesConfig()
    from simkit.config import config_from_args

    return config_from_args(RolesConfig, argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "config"}))


@dataclass
class Roles:
    policy: Policy
    simulator: object
    classifier: object
    clients: list[RoleClient]

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


TransportFactory = Callable[[str, ClientSettings, str | None], ChatTransport]


def default_transport(role: str, settings: ClientSettings, api_key: str | None) -> ChatTransport:
    return make_transport(settings.transport, api_key)


def _client(role: str, urls: list[str], model: str | None, settings: ClientSettings, transport: TransportFactory,
            **sampling: Any) -> RoleClient:
    cfg = RoleConfig(base_urls=urls, model=model, sampling=sampling, **settings.model_dump())
    api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    if cfg.api_key_env and not api_key:
        raise ValueError(f"role {role!r}: environment variable {cfg.api_key_env} is not set")
    return RoleClient(role, cfg, transport=transport(role, settings, api_key))


def build_roles(cfg: RolesConfig | argparse.Namespace, env_name: str | None = None, *,
                transport: TransportFactory = default_transport) -> Roles:
    """Clients and agents for the three roles. `transport(role, settings, api_key)` makes each
    client's HTTP transport (a load test wraps it to record every request)."""
    cfg = roles_config(cfg)
    if not cfg.policy.url:
        raise ValueError("the policy needs a URL (--policy URL)")
    s = cfg.client
    pc = _client("policy", cfg.policy.url, cfg.policy.model, s, transport, temperature=cfg.policy.temperature,
                 max_tokens=cfg.policy.max_tokens)
    clients = [pc]
    if cfg.simulator.offline:
        sim: object = GroundedSimulator()
    else:
        sc = _client("simulator", _urls(cfg.simulator.url), cfg.simulator.model, s, transport)
        clients.append(sc)
        sim = LLMSimulator(sc, env=env_name)
    if cfg.classifier.offline:
        clf: object = RuleClassifier()
    else:
        cc = _client("classifier", _urls(cfg.classifier.url), cfg.classifier.model, s, transport)
        clients.append(cc)
        clf = LLMClassifier(cc, env=env_name)
    return Roles(Policy(pc), sim, clf, clients)


def build_loser_generator(roles: Roles, cfg: RolesConfig, url: str | None, model: str | None, pool: Any,
                          env_name: str | None = None, seed: int = 0,
                          transport: TransportFactory = default_transport) -> Any:
    """The authors' few-shot loser generator (`agents.LoserGenerator`): over `url` (its client is
    added to `roles.clients`, closed with them) or, by default, the policy's own client."""
    from simkit.roles.agents import LoserGenerator

    backend: Any = roles.policy
    if url:
        client = _client("generator", _urls(url), model, cfg.client, transport)
        roles.clients.append(client)
        backend = Policy(client, model)
    return LoserGenerator(backend, list(pool), env=env_name, seed=seed)


def set_rollout_sampling(roles: Roles, temperature: float | None) -> None:
    """Phase 2 rollout sampling. None: send no temperature / top_p, so the server's defaults
    apply — the checkpoint's generation_config.json under vLLM's `--generation-config auto` and
    in simkit's embedded server — as the authors sample with the model's generation config
    (simulator.py `generate_response`). A number: sent with every policy request (the older
    behaviour, `--temperature`)."""
    sampling = roles.policy.client.config.sampling
    sampling.pop("top_p", None)
    if temperature is None:
        sampling.pop("temperature", None)
    else:
        sampling["temperature"] = temperature
