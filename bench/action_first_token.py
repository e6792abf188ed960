"""Where a policy's first reply token puts its probability mass on held-out AmbigSQL turns: on
words that open a question ("Which", "What", "Do", ...) or on "SELECT". Greedy metrics only show
which side wins; this shows how far training moved each side (bench/RESULTS.md, the ACT runs).

    python bench/action_first_token.py --model runs/models/smollm2 \
        --adapter sft=runs/demo/sft/adapter --adapter act=RUN/adapters/.../v000001 --limit 48 --seed 0

Turns: the same seeded test sample `simkit eval --split test --limit N --seed S` evaluates."""
from __future__ import annotations

import argparse
import json

QUESTION_STARTS = ["Which", "What", "Do", "Could", "How", "Are", "Is", "Did", "Would", "Can"]


def first_token_ids(tok, words: list[str]) -> list[int]:
    return sorted({tok.encode(p + w, add_special_tokens=False)[0] for w in words for p in ("", " ")})


def main() -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simkit.env import make
    from simkit.eval import task_order

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="base model directory")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="LoRA adapters to compare")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=48, help="tasks, chosen as `simkit eval --limit` chooses them")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    env = make("ambigsql")
    tasks = task_order(env.tasks(a.split), a.seed, a.limit)
    tok = AutoTokenizer.from_pretrained(a.model)
    q_ids, s_ids = first_token_ids(tok, QUESTION_STARTS), first_token_ids(tok, ["SELECT"])

    def measure(model) -> dict:
        acc: dict[str, list[tuple[float, float]]] = {}
        for t in tasks:
            msgs = [{"role": "system", "content": env.system_prompt}, *[m.model_dump() for m in t.prompt]]
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                p = model(ids["input_ids"], logits_to_keep=1).logits[0, -1].float().softmax(-1)
            acc.setdefault(t.gold_action, []).append((p[q_ids].sum().item(), p[s_ids].sum().item()))
        return {g: {"p_question_start": sum(x for x, _ in v) / len(v), "p_select": sum(y for _, y in v) / len(v),
                    "n": len(v)} for g, v in acc.items()}

    base = AutoModelForCausalLM.from_pretrained(a.model).eval()
    res = {"base": measure(base)}
    if a.adapter:
        model = None
        for spec in a.adapter:
            name, path = spec.split("=", 1)
            if model is None:
                model = PeftModel.from_pretrained(base, path, adapter_name=name)
            else:
                model.load_adapter(path, adapter_name=name)
            model.set_adapter(name)
            res[name] = measure(model)
    print(f"{'policy':<12} {'gold action':<12} {'P(question start)':>18} {'P(SELECT)':>10} {'n':>4}")
    for name, by in res.items():
        for g, r in sorted(by.items()):
            print(f"{name:<12} {g:<12} {r['p_question_start']:>18.4f} {r['p_select']:>10.4f} {r['n']:>4}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
