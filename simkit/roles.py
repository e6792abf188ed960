"""Build the three roles (policy, simulator, classifier) from command-line flags.

Shared by `pairs build`, `serve`, `eval` and `loadtest` so every command takes the same flags.
`--simulator grounded` and `--classifier rule` are the offline implementations; a URL (or
several, comma-separated) selects the LLM implementation over that OpenAI-compatible server.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from .agents import GroundedSimulator, LLMClassifier, LLMSimulator, Policy, RuleClassifier
from .client import RoleClient, RoleConfig

_RC = RoleConfig()  # one default per setting: the role config's


def add_role_args(p: argparse.ArgumentParser, policy_required: bool = True) -> None:
    g = p.add_argument_group("roles (OpenAI-compatible servers: vLLM, simkit model-server, API models)")
    g.add_argument("--policy", required=policy_required, metavar="URL[,URL...]",
                   help="policy base URL(s), e.g. http://127.0.0.1:8000/v1; several are load-balanced")
    g.add_argument("--policy-model", "--model", dest="policy_model",
                   help="policy model or adapter name (default: the server's first model)")
    g.add_argument("--simulator", metavar="grounded|URL",
                   help="user simulator: 'grounded' replays the dataset's answer (offline), or an LLM URL")
    g.add_argument("--simulator-model", help="simulator model name (default: the server's first model)")
    g.add_argument("--classifier", metavar="rule|URL",
                   help="action classifier: 'rule' (offline heuristics) or an LLM URL (few-shot Yes/No)")
    g.add_argument("--classifier-model", help="classifier model name (default: the server's first model)")
    g.add_argument("--api-key-env", help="environment variable holding the API key for all roles (never a flag)")
    g.add_argument("--transport", choices=["fast", "aiohttp", "openai"],
                   help="HTTP client: fast (simkit's raw HTTP/1.1 keep-alive client, default; ~45 us CPU/request), "
                        "aiohttp (~190 us; proxies, redirects), or the openai SDK (~2.7 ms; API-model features)")
    g.add_argument("--max-in-flight", type=int,
                   help=f"max concurrent requests per role (default {_RC.max_in_flight})")
    g.add_argument("--timeout", type=float,
                   help=f"per-request timeout in seconds (default {_RC.timeout_s:.0f}: a CPU model's queue can be "
                        "long; overload is shed by the server with 503 + Retry-After, which the client honours)")
    g.add_argument("--max-retries", type=int,
                   help=f"retries on 429/5xx/timeouts, waiting Retry-After when the server gives it "
                        f"(default {_RC.max_retries})")
    g.add_argument("--temperature", type=float, help="policy sampling temperature (default 0.7)")
    g.add_argument("--max-tokens", type=int, help="policy max completion tokens (default 256)")


ROLE_DEFAULTS = {"simulator": "grounded", "classifier": "rule", "transport": _RC.transport,
                 "max_in_flight": _RC.max_in_flight, "timeout": _RC.timeout_s, "max_retries": _RC.max_retries,
                 "temperature": 0.7, "max_tokens": 256, "policy_model": None,
                 "simulator_model": None, "classifier_model": None, "api_key_env": None}


def apply_role_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill role flags left unset (flags default to None so a YAML config can supply them)."""
    for k, v in ROLE_DEFAULTS.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


@dataclass
class Roles:
    policy: Policy
    simulator: object
    classifier: object
    clients: list[RoleClient]

    async def aclose(self) -> None:
        for c in self.clients:
            await c.aclose()


def _client(role: str, urls: str, model: str | None, args: argparse.Namespace, **sampling) -> RoleClient:
    cfg = RoleConfig(base_urls=[u.strip() for u in urls.split(",") if u.strip()], model=model,
                     api_key_env=args.api_key_env, max_in_flight=args.max_in_flight, timeout_s=args.timeout,
                     max_retries=args.max_retries, transport=args.transport, sampling=sampling)
    return RoleClient(role, cfg)


def build_roles(args: argparse.Namespace, env_name: str | None = None) -> Roles:
    args = apply_role_defaults(args)
    clients = []
    pc = _client("policy", args.policy, args.policy_model, args, temperature=args.temperature,
                 max_tokens=args.max_tokens)
    clients.append(pc)
    if args.simulator == "grounded":
        sim = GroundedSimulator()
    else:
        sc = _client("simulator", args.simulator, args.simulator_model, args)
        clients.append(sc)
        sim = LLMSimulator(sc, env=env_name)
    if args.classifier == "rule":
        clf = RuleClassifier()
    else:
        cc = _client("classifier", args.classifier, args.classifier_model, args)
        clients.append(cc)
        clf = LLMClassifier(cc, env=env_name)
    return Roles(Policy(pc), sim, clf, clients)
