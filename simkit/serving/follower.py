"""The version follower: reads the version the trainer published and switches the policy.

The policy (`simkit.Policy.set_model(adapter, version)`) stamps each reply with the version
whose adapter it asked, so turns are stamped per request, not per episode: a switch in the
middle of an episode gives its later turns the new version. Stale pairs are not serve's
business: the trainer drops them when it leases (one staleness rule, at consume).
"""
from __future__ import annotations

from typing import Any


class VersionFollower:
    def __init__(self, queue, policy: Any):
        self.queue, self.policy = queue, policy
        self.version = 0
        self.adapter: str | None = None

    async def follow(self) -> bool:
        """Switch to a newer published version, if any; True when it switched."""
        v = await self.queue.current_version()
        if v is None or v.version <= self.version:
            return False
        self.version, self.adapter = v.version, v.adapter
        if hasattr(self.policy, "set_model"):
            try:
                self.policy.set_model(v.adapter, v.version)
            except TypeError:  # a policy without version stamping
                self.policy.set_model(v.adapter)
        return True
