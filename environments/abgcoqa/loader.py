"""Abg-CoQA (Guo et al., AKBC 2021): ambiguous questions in CoQA-style story conversations.

Source: `abgcoqa/coqa_abg_val.json` under the data root (MeiqiGuo/AKBC2021-Abg-CoQA, MIT):
1,092 examples, 130 marked ``ambiguous``. One task per example:

* prompt: the story as context and the first history question in the first user message
  (``Story:\\n<story>\\n\\n<question>``), the history turns' answers as assistant messages, ending
  with the target question;
* ambiguous -> gold action CLARIFY, reference = ``clarification_turn.question`` (3 questions that
  end without "?" get one, so the reference reads as the question it is); the simulated user's
  reply is ``clr_ans`` and the goal ``org_ans`` of the first reading whose ``org_ans`` is not
  "Unknown" (readings are ``clarification_turn.answers``; all of them, and the other annotators'
  ``org_ans_2``/``org_ans_3``, are kept in ``task.meta``);
* otherwise -> ANSWER, reference = goal = the CoQA answer of the target turn.

Deviation from the paper (documented): Abg-CoQA's train split is not available and its test split
is not provided here, so the validation file is divided **by story** (examples sharing a story,
i.e. the first ``|``-field of the id, stay together) into a tuning pool ``tune`` and a held-out
``eval`` set: stories are ordered by the SHA-1 of ``"abgcoqa:" + story id`` and the first
``round(#stories * tune_fraction)`` (default half: 250 of 500) form ``tune``. Deterministic.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from simkit.datafile import cached_records, data_file, each
from simkit.types import ANSWER, CLARIFY, Message, Task

ENV = "abgcoqa"
FILE = Path("abgcoqa") / "coqa_abg_val.json"
SPLITS = ("tune", "eval")


def _path(data_dir: str | Path) -> Path:
    return data_file(data_dir, FILE, "Abg-CoQA data")


def load_examples(data_dir: str | Path) -> list[dict[str, Any]]:
    """The examples of the file's "data" list; a corrupt file is a `DataError` naming file and line."""
    return [e for _, e in cached_records(_path(data_dir), key="data")]


def story_id(example: dict[str, Any]) -> str:
    return example["id"].split("|")[0]


def _is_unknown(text: str) -> bool:
    return text.strip().lower().rstrip(".") in ("", "unknown")


def as_question(text: str) -> str:
    t = text.strip()
    return t if t.endswith("?") else t.rstrip(".") + "?"


def pick_reading(answers: list[dict[str, str]]) -> dict[str, str]:
    """The reading the simulated user takes: the first with a known original answer."""
    return next((a for a in answers if not _is_unknown(a.get("org_ans", ""))), answers[0])


def build_prompt(example: dict[str, Any]) -> list[Message]:
    turns = sorted(example["history_turns"], key=lambda t: t["turn_id"])
    story = example["story"].strip()
    questions = [t["question"] for t in turns] + [example["target_turn"]["question"]]
    msgs: list[Message] = []
    for i, q in enumerate(questions):
        msgs.append(Message(role="user", content=f"Story:\n{story}\n\n{q}" if i == 0 else q))
        if i < len(turns):
            msgs.append(Message(role="assistant", content=turns[i]["answer"]))
    return msgs


def example_task(example: dict[str, Any], split: str) -> Task:
    prompt = build_prompt(example)
    tid = f"{ENV}-" + example["id"].replace("|", "-")
    target = example["target_turn"]
    meta = {"story": story_id(example), "split": split, "source": example.get("source", ""),
            "ambiguity": example["ambiguity"], "target_turn": target["turn_id"]}
    if example["ambiguity"] == "ambiguous":
        clar = example["clarification_turn"]
        reading = pick_reading(clar["answers"])
        alternatives = [reading[k] for k in ("org_ans_2", "org_ans_3")
                        if k in reading and not _is_unknown(reading[k])]
        return Task(id=tid, env=ENV, prompt=prompt, reference=as_question(clar["question"]),
                    gold_action=CLARIFY, goal=reading["org_ans"], user_reply=reading["clr_ans"],
                    grounding={"clarifying_question": clar["question"], "reply": reading["clr_ans"]},
                    meta={**meta, "readings": clar["answers"], "goal_alternatives": alternatives,
                          "coqa_answer": target["answer"]})
    return Task(id=tid, env=ENV, prompt=prompt, reference=target["answer"], gold_action=ANSWER,
                goal=target["answer"], grounding={"rationale": target.get("rationale", "")}, meta=meta)


def split_of(examples: list[dict[str, Any]], tune_fraction: float = 0.5) -> dict[str, str]:
    """Story id -> split name (deterministic: ranked by a hash of the story id)."""
    stories = sorted({story_id(e) for e in examples},
                     key=lambda s: hashlib.sha1(f"{ENV}:{s}".encode()).hexdigest())
    n_tune = round(len(stories) * tune_fraction)
    return {s: ("tune" if i < n_tune else "eval") for i, s in enumerate(stories)}


@functools.lru_cache(maxsize=8)
def _load_tasks(path: str, tune_fraction: float) -> dict[str, tuple[Task, ...]]:
    file = _path(path)
    records = list(cached_records(file, key="data"))
    stories = each(file, records, story_id)
    which = split_of([{"id": s} for s in stories], tune_fraction)
    out: dict[str, list[Task]] = {s: [] for s in SPLITS}
    for task in each(file, records, lambda e: example_task(e, which[story_id(e)])):
        out[task.meta["split"]].append(task)
    return {s: tuple(v) for s, v in out.items()}


def load_tasks(data_dir: str | Path, tune_fraction: float = 0.5) -> dict[str, list[Task]]:
    """Split name -> tasks, in file order."""
    return {s: list(v) for s, v in _load_tasks(str(Path(data_dir).resolve()), float(tune_fraction)).items()}
