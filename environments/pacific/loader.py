"""PACIFIC (Deng et al., EMNLP 2022): proactive conversational QA over financial tables + text.

Source: `pacific/validation.json` under the data root (dengyang17/PACIFIC, MIT). 277 dialogues,
each a table, its paragraphs and 6-10 user turns; 320 turns have ``req_clari`` set (the turn's
``answer`` is then the clarifying question).

One task per user turn:

* prompt: the report as context (paragraphs, then table rows rendered ``first cell : c1 | c2``, the
  authors' ``[context]`` / ``[data]`` layout from learning_to_clarify's convert_pacific.py) followed by
  the first question in the first user message, then the dialogue so far (earlier answers
  rendered with `answer_text`), ending with this turn's question;
* gold action CLARIFY for a ``req_clari`` turn, else ANSWER;
* reference r_i: this turn's answer (for CLARIFY, the clarifying question);
* goal g_i: for CLARIFY the *next* turn's answer, and the user's reply to the clarifying question
  is the next turn's question (simulator grounding: the next turn's ``original_question``, the fully
  specified request); for ANSWER the reference itself.

Answers are rendered as text with their scale so that TAT-QA's normalisation sees it: spans joined
by ", ", a numeric item with scale percent gets "%" ("-22.22%"), with thousand/million/billion the
word ("-12.6 million"). The authors' conversion instead uses ``str(answer)`` and prepends the
derivation for arithmetic answers ("44.1-56.7 = -12.6"); the raw answer, scale, type and derivation
are kept in ``task.meta["gold"]`` for UniPCQA's official scoring (`tatqa_metric.official_em_f1`).

Deviation from the paper (documented): the paper trains on PACIFIC's train split and evaluates on
its test split. Here train.json is not available and test.json has no answers, so the only
labelled split, validation.json, is divided **by dialogue** (a dialogue's turns never straddle the
two) into a tuning pool ``tune`` and a held-out ``eval`` set: dialogues are ordered by the SHA-1 of
``"pacific:" + table uid`` and the first ``round(277 * tune_fraction)`` (default half: 138) form
``tune``. The split depends only on the data, never on a seed.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from simkit.datafile import cached_records, data_file, each
from simkit.types import ANSWER, CLARIFY, Message, Task

from .tatqa_metric import is_number

ENV = "pacific"
FILE = Path("pacific") / "validation.json"
SPLITS = ("tune", "eval")


def _path(data_dir: str | Path) -> Path:
    return data_file(data_dir, FILE, "PACIFIC data")


def load_dialogues(data_dir: str | Path) -> list[dict[str, Any]]:
    """The raw dialogues; a corrupt file is a `DataError` naming file and line."""
    return [d for _, d in cached_records(_path(data_dir))]


def render_table(table: list[list[str]]) -> list[str]:
    return [f"{row[0]} : " + " | ".join(row[1:]) for row in table if row]


def render_context(dialogue: dict[str, Any]) -> str:
    paragraphs = sorted(dialogue.get("paragraphs", []), key=lambda p: p.get("order", 0))
    text = "\n".join(p["text"].replace("\n", " ") for p in paragraphs)
    table = "\n".join(render_table(dialogue["table"]["table"]))
    return f"[context]\n{text}\n[data]\n{table}"


def _with_scale(item: str, scale: str) -> str:
    if not scale or not is_number(item):
        return item
    if scale == "percent":
        return item if "%" in item else f"{item}%"
    return f"{item} {scale}"


def answer_text(answer: Any, scale: str = "") -> str:
    """A PACIFIC answer (list of spans, number or count string) as one reply text."""
    items = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
    return ", ".join(_with_scale(item, scale) for item in items)


def split_of(dialogues: list[dict[str, Any]], tune_fraction: float = 0.5) -> dict[str, str]:
    """Table uid -> split name (deterministic: ranked by a hash of the uid)."""
    uids = sorted((d["table"]["uid"] for d in dialogues),
                  key=lambda u: hashlib.sha1(f"{ENV}:{u}".encode()).hexdigest())
    n_tune = round(len(uids) * tune_fraction)
    return {u: ("tune" if i < n_tune else "eval") for i, u in enumerate(uids)}


def _gold(q: dict[str, Any]) -> dict[str, Any]:
    return {"answer": q["answer"], "scale": q.get("scale", ""), "answer_type": q["answer_type"],
            "derivation": q.get("derivation", ""), "uid": q["uid"]}


def dialogue_tasks(dialogue: dict[str, Any], split: str) -> list[Task]:
    questions = sorted(dialogue["questions"], key=lambda q: q["order"])
    context = render_context(dialogue)
    uid = dialogue["table"]["uid"]
    tasks: list[Task] = []
    history: list[Message] = []
    for i, q in enumerate(questions):
        user_text = f"{context}\n\n{q['question']}" if i == 0 else q["question"]
        prompt = [*history, Message(role="user", content=user_text)]
        reference = answer_text(q["answer"], q.get("scale", ""))
        meta = {"dialogue": uid, "turn": q["order"], "split": split, "answer_type": q["answer_type"],
                "answer_from": q.get("answer_from", ""), "follow_up": q.get("follow_up", False)}
        if q["req_clari"]:
            if i + 1 >= len(questions):  # never happens in validation.json; no goal to reach
                continue
            nxt = questions[i + 1]
            goal = answer_text(nxt["answer"], nxt.get("scale", ""))
            tasks.append(Task(id=f"{ENV}-{q['uid']}", env=ENV, prompt=prompt, reference=reference,
                              gold_action=CLARIFY, goal=goal, user_reply=nxt["question"],
                              grounding={"intent": nxt.get("original_question", ""), "reply": nxt["question"]},
                              meta={**meta, "gold": _gold(nxt)}))
        else:
            tasks.append(Task(id=f"{ENV}-{q['uid']}", env=ENV, prompt=prompt, reference=reference,
                              gold_action=ANSWER, goal=reference,
                              grounding={"intent": q.get("original_question", q["question"])},
                              meta={**meta, "gold": _gold(q)}))
        history = [*prompt, Message(role="assistant", content=reference)]
    return tasks


@functools.lru_cache(maxsize=8)
def _load_tasks(path: str, tune_fraction: float) -> dict[str, tuple[Task, ...]]:
    file = _path(path)
    records = list(cached_records(file))
    uids = each(file, records, lambda d: str(d["table"]["uid"]))
    which = split_of([{"table": {"uid": u}} for u in uids], tune_fraction)
    out: dict[str, list[Task]] = {s: [] for s in SPLITS}
    per_dialogue = each(file, records, lambda d: dialogue_tasks(d, which[str(d["table"]["uid"])]))
    for uid, tasks in zip(uids, per_dialogue):
        out[which[uid]].extend(tasks)
    return {s: tuple(v) for s, v in out.items()}


def load_tasks(data_dir: str | Path, tune_fraction: float = 0.5) -> dict[str, list[Task]]:
    """Split name -> tasks, in file order (dialogue, then turn)."""
    return {s: list(v) for s, v in _load_tasks(str(Path(data_dir).resolve()), float(tune_fraction)).items()}
