import pytest
from pydantic import ValidationError

from simkit.types import ACTIONS, ANSWER, CLARIFY, ActionSpace, Message, PreferencePair, Task, opposite


def test_action_registry_validates_and_extends():
    assert ACTIONS.validate("clarify") == CLARIFY
    with pytest.raises(ValueError, match="unknown action"):
        ACTIONS.validate("REFUSE")
    space = ActionSpace()
    space.register("refuse")
    assert "REFUSE" in space and space.validate("Refuse") == "REFUSE"
    assert opposite(CLARIFY) == ANSWER and opposite(ANSWER) == CLARIFY


def test_task_rejects_unknown_gold_action():
    with pytest.raises(ValidationError):
        Task(id="x", env="toy", prompt=[], reference="r", gold_action="MAYBE")


def _pair(**kw):
    base = dict(prompt=[Message(role="user", content="q")], chosen=[Message(role="assistant", content="a")],
                rejected=[Message(role="assistant", content="b")], gold_action=ANSWER, task_id="t1")
    return PreferencePair(**{**base, **kw})


def test_pair_ids_are_content_addressed():
    a, b = _pair(), _pair()
    assert a.id == b.id and len(a.id) == 20
    assert _pair(policy_version=2).id != a.id
    assert _pair(rejected=[Message(role="assistant", content="c")]).id != a.id
    row = a.to_trl()
    assert row["prompt"][0] == {"role": "user", "content": "q"} and set(row) == {"prompt", "chosen", "rejected"}
    assert PreferencePair.model_validate_json(a.model_dump_json()) == a
