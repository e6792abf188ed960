"""The policy version has one holder, serve's `VersionFollower`: the policy asks it per request
(no copy to go stale), and the turns stay stamped with the version that wrote them."""
import simkit
from simkit.queue import AsyncPairQueue, open_queue
from simkit.serving import VersionFollower
from simkit.types import Reply


class EchoClient:
    async def complete(self, messages, model=None, **sampling) -> Reply:
        return Reply(text="ok", model=model or "")


async def test_the_policy_asks_the_follower_for_its_version(tmp_path):
    policy = simkit.Policy(EchoClient())
    assert policy.version is None and (await policy.respond([])).policy_version is None  # no holder: unstamped
    async with AsyncPairQueue(open_queue(tmp_path / "q.db")) as queue:
        follower = VersionFollower(queue, policy)
        assert not await follower.follow() and policy.version == 0  # nothing published yet
        await queue.publish_version(3, "policy-v3")
        assert await follower.follow()
        reply = await policy.respond([])
        assert (reply.model, reply.policy_version) == ("policy-v3", 3)
        follower.version = 4  # only the follower holds it: the policy sees any change at once
        assert policy.version == 4 and "version" not in vars(policy)
