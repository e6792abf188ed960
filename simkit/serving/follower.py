"""The version follower: reads the version the trainer published, switches the policy, and heals it.

The follower is the one holder of the policy version: it switches the policy's adapter
(`Policy.set_model`) and the policy asks it for the version as each request goes out
(`Policy.stamp_from`), so turns are stamped per request, not per episode: a switch in the
middle of an episode gives its later turns the new version. Stale pairs are not serve's
business: the trainer drops them when it leases (one staleness rule, at consume).

Healing: a restarted policy server has no adapters, and a finished trainer never publishes
again, so without it every episode would fail ("The model `x` does not exist.", 404) until the
next publish. The follower holds the current version and where its adapter was saved (the
publisher records the path with the version), so it loads it again: `heal()` runs at start and
whenever `HealingPolicy` sees a policy call answered 404 for the current adapter (then that call
is retried once).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Sequence

log = logging.getLogger("simkit.serving.serve")


def model_missing(e: BaseException) -> bool:
    """The server does not have the requested model: vLLM and simkit's model server answer 404
    NotFoundError "The model `x` does not exist." (the role client wraps it in a RoleError)."""
    seen: BaseException | None = e
    while seen is not None:
        if getattr(seen, "status", None) == 404 or "does not exist" in str(seen):
            return True
        seen = seen.__cause__
    return False


class VersionFollower:
    """The current policy version, its adapter and where it was saved; serve asks it, nothing copies it."""

    def __init__(self, queue, policy: Any, timeout_s: float = 30.0):
        self.queue, self.policy = queue, policy
        self.version = 0
        self.adapter: str | None = None
        self.path: str | None = None  # where the current version's adapter was saved
        self.timeout_s = timeout_s
        self.heals = 0  # adapter reloads into a server that had lost it
        self._lock: asyncio.Lock | None = None
        self._checked_at = -1e9  # monotonic start of the last check that left every server healthy
        if hasattr(policy, "stamp_from"):
            policy.stamp_from(self)

    async def follow(self) -> bool:
        """Switch to a newer published version, if any; True when it switched."""
        v = await self.queue.current_version()
        if v is None or v.version <= self.version:
            return False
        self.version, self.adapter, self.path = v.version, v.adapter, v.path
        if hasattr(self.policy, "set_model"):
            self.policy.set_model(v.adapter)
        return True

    async def heal(self, missing: str | None = None) -> bool:
        """Load the current adapter again into each policy server that lost it. True when every
        server has it now. `missing`: the model a server said it lacks (another one: not ours)."""
        client = getattr(self.policy, "client", None)
        if self.adapter is None or not self.path or client is None or missing not in (None, self.adapter):
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        asked = time.monotonic()
        async with self._lock:  # many episodes fail at once: one of them reloads, the others wait
            if self._checked_at >= asked:  # a check that began after our call failed found all well
                return True
            started, ok = time.monotonic(), True
            for url in [e.url for e in getattr(client, "endpoints", ())]:
                ok &= await self._heal_one(client.transport, url)
            if ok:
                self._checked_at = started
            return ok

    async def _heal_one(self, transport: Any, url: str) -> bool:
        """Reload the adapter into `url` if it is not listed there (the one adapter load,
        `simkit.modelserver.info.load_adapter`, as the trainer's publisher does it)."""
        from simkit.modelserver.info import AdapterLoadError, load_adapter
        from simkit.roles.transport import TransportError

        name = self.adapter
        try:
            if name in _ids((await transport.get_json(url, "/models", self.timeout_s)) or {}):
                return True
            await load_adapter(transport, url, name, self.path, self.timeout_s)
        except (TransportError, AdapterLoadError) as e:
            log.warning("policy server %s lacks adapter %s (v%d) and reloading it from %s failed: %s",
                        url, name, self.version, self.path, e)
            return False
        self.heals += 1
        log.warning("policy server %s had lost adapter %s (v%d, a restart?): loaded it again from %s",
                    url, name, self.version, self.path)
        return True


def _ids(models: dict) -> Sequence[str]:
    return [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]


class HealingPolicy:
    """A policy whose call answered "model does not exist" heals the follower's adapter and is
    retried once. Everything else (model, version, set_model) is the wrapped policy's."""

    def __init__(self, policy: Any, follower: VersionFollower):
        self.policy, self.follower = policy, follower

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    async def respond(self, messages: Any, instruction: str | None = None, task: Any = None, **sampling: Any) -> Any:
        asked = getattr(self.policy, "model", None)
        try:
            return await self.policy.respond(messages, instruction=instruction, task=task, **sampling)
        except Exception as e:
            if not model_missing(e) or not await self.follower.heal(asked):
                raise
        return await self.policy.respond(messages, instruction=instruction, task=task, **sampling)
