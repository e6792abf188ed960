"""Where a policy's first reply token puts its probability mass on held-out AmbigSQL turns: on
words that open a question ("Which", "What", "Do", ...) or on "SELECT". Greedy metrics only show
which side wins; this shows how far training moved each side (bench/RESULTS.md, the ACT runs).

    python bench/action_first_token.py --model runs/models/smollm2 \
        --adapter sft=runs/demo/sft/adapter --adapter act=RUN/adapters/.../v000001 --limit 48 --seed 0

Turns: the same seeded test sample `simkit eval --split test --n-tasks N --seed S` evaluates, or
exactly the ids of `--tasks-file FILE` (as `simkit eval --tasks-file`).

Per-task evidence: `--rows PATH` (the last policy measured: the last --adapter, else the base) or
`--rows NAME=PATH` (repeatable) writes each task's `p_question` (the first-token probability of a
question opener) into a per-task rows file (simkit/evaluation/results.py), merged by task_id: rows already
there keep every other field; a missing file is created with only task_id, gold_action and
p_question filled."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

QUESTION_STARTS = ["Which", "What", "Do", "Could", "How", "Are", "Is", "Did", "Would", "Can"]


def first_token_ids(tok, words: list[str]) -> list[int]:
    return sorted({tok.encode(p + w, add_special_tokens=False)[0] for w in words for p in ("", " ")})


def when_numbers(clarify: list[tuple[float, float]], answer: list[tuple[float, float]]) -> dict:
    """Does the first token tell the turns apart? AUROC of P(question opener) (gold CLARIFY above
    gold ANSWER; 0.5 = blind, however much mass moved), and the first-token decision "ask when the
    question openers outweigh SELECT": its ask rate on each side and their difference J."""
    pairs = [(c[0] > a[0]) + 0.5 * (c[0] == a[0]) for c in clarify for a in answer]
    ask_c = sum(q > s for q, s in clarify) / max(1, len(clarify))
    ask_a = sum(q > s for q, s in answer) / max(1, len(answer))
    return {"auroc": sum(pairs) / max(1, len(pairs)), "ask_clarify": ask_c, "ask_answer": ask_a, "j": ask_c - ask_a}


def merge_p_question(path: str | os.PathLike, p_by_task: dict[str, float], gold: dict[str, str],
                     meta: dict | None = None) -> tuple[int, int]:
    """Set `p_question` of each task's row in a rows file (created if missing); (updated, added)."""
    from simkit.evaluation.results import FIELDS, read_rows, write_rows

    path = Path(path)
    old_meta, rows = read_rows(path) if path.exists() else ({}, [])
    by_id = {r["task_id"]: r for r in rows}
    updated = added = 0
    for tid, p in p_by_task.items():
        if tid in by_id:
            by_id[tid]["p_question"] = p
            updated += 1
        else:
            row = {k: None for k in FIELDS}
            row.update(task_id=tid, gold_action=gold[tid], p_question=p, asked=None, status="p_question_only")
            rows.append(row)
            by_id[tid] = row
            added += 1
    write_rows(path, rows, {**old_meta, **(meta or {})})
    return updated, added


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simkit.env import make
    from simkit.evaluation.evaluate import task_order

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model directory")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="LoRA adapters to compare")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=48, help="tasks, chosen as `simkit eval --n-tasks` chooses them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks-file", help="measure exactly these task ids ({\"task_ids\": [...]}, order kept)")
    ap.add_argument("--rows", action="append", default=[], metavar="[NAME=]PATH",
                    help="merge each task's p_question into this per-task rows file (NAME: which policy; default "
                         "the last measured)")
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--skip-base", action="store_true", help="measure only the adapters (the base row was measured "
                                                             "on the same turns before)")
    a = ap.parse_args()
    env = make("ambigsql")
    if a.tasks_file:
        from simkit.evaluation.evaluate import load_tasks_file

        tasks = load_tasks_file(a.tasks_file, env.tasks(a.split))[: a.limit or None]
    else:
        tasks = task_order(env.tasks(a.split), a.seed, a.limit)
    tok = AutoTokenizer.from_pretrained(a.model)
    q_ids, s_ids = first_token_ids(tok, QUESTION_STARTS), first_token_ids(tok, ["SELECT"])

    per_task: dict[str, dict[str, float]] = {}

    def measure(model, name: str) -> dict:
        acc: dict[str, list[tuple[float, float]]] = {}
        per_task[name] = {}
        for t in tasks:
            msgs = [{"role": "system", "content": env.system_prompt}, *[m.model_dump() for m in t.prompt]]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                p = model(ids["input_ids"], logits_to_keep=1).logits[0, -1].float().softmax(-1)
            acc.setdefault(t.gold_action, []).append((p[q_ids].sum().item(), p[s_ids].sum().item()))
            per_task[name][t.id] = round(p[q_ids].sum().item(), 6)
        out = {g: {"p_question_start": sum(x for x, _ in v) / len(v), "p_select": sum(y for _, y in v) / len(v),
                   "n": len(v)} for g, v in acc.items()}
        out["when"] = when_numbers(acc.get("CLARIFY", []), acc.get("ANSWER", []))
        return out

    base = AutoModelForCausalLM.from_pretrained(a.model).eval()
    res = {} if a.skip_base and a.adapter else {"base": measure(base, "base")}
    if a.adapter:
        model = None
        for spec in a.adapter:
            name, path = spec.split("=", 1)
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
            model.set_adapter(name)
            res[name] = measure(model, name)
    print(f"{'policy':<12} {'gold action':<12} {'P(question start)':>18} {'P(SELECT)':>10} {'n':>4}")
    for name, by in res.items():
        for g, r in sorted(by.items()):
            if g != "when":
                print(f"{name:<12} {g:<12} {r['p_question_start']:>18.4f} {r['p_select']:>10.4f} {r['n']:>4}")
    print(f"\n{'policy':<12} {'AUROC of P(question)':>21} {'asks (q > SELECT): CLARIFY':>27} {'ANSWER':>7} {'J':>6}")
    for name, by in res.items():
        w = by["when"]
        print(f"{name:<12} {w['auroc']:>21.3f} {w['ask_clarify']:>27.3f} {w['ask_answer']:>7.3f} {w['j']:>6.3f}")
    gold = {t.id: t.gold_action for t in tasks}
    for spec in a.rows:
        name, path = spec.split("=", 1) if "=" in spec and not os.path.exists(spec) else (list(res)[-1], spec)
        if name not in per_task:
            raise SystemExit(f"--rows {spec}: no policy {name!r} measured (have {', '.join(per_task)})")
        up, add = merge_p_question(path, per_task[name], gold, {"p_question_model": a.model, "p_question_policy": name})
        print(f"p_question of {name}: {up} rows updated, {add} added in {path}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
