"""Does the policy's own representation already know *when* to ask? A linear probe.

A logistic regression reads the hidden state of the last prompt token (the position that emits the
first reply token, where the ask-or-answer decision is made) at several layers of a frozen model,
trained on the same n training conversations `trainer sft --n-conversations N --sample-seed S`
uses, and scored on dev tasks. It separates two explanations of a policy that asks "more, not
when": a probe near the text classifier's score means the features are there and the training
signal fails to reach them; a probe near chance means the model cannot tell the turns apart.

    python bench/action_probe.py --model runs/models/smollm2 --n 100 --seed 0 --split dev --limit 200 \
        [--adapter sft=RUN/adapter] [--json out.json]

Prints, per layer, the probe's Macro F1 and J (ask rate on gold CLARIFY minus on gold ANSWER) on
the eval tasks, next to the text classifier (`simkit textclf`) trained on the same conversations.
Never run it on the sealed test sample: it is a diagnosis, and its layer choice is made on dev."""
from __future__ import annotations

import argparse
import json
import time


def hidden_states(model, tok, env, tasks, layers: list[int]):
    import torch

    out = []
    for t in tasks:
        msgs = [{"role": "system", "content": env.system_prompt}, *[m.model_dump() for m in t.prompt]]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            hs = model(ids["input_ids"], output_hidden_states=True, logits_to_keep=1).hidden_states
        out.append([hs[i][0, -1].float().numpy() for i in layers])
    return out


def main() -> None:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from simkit.env import make
    from simkit.evaluation.evaluate import task_order
    from simkit.sampling import sample_conversations
    from simkit.evaluation.stats import macro_f1
    from simkit.evaluation.textclf import TextActionClassifier
    from simkit.types import CLARIFY

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", help="NAME=DIR: probe the model with this LoRA adapter on")
    ap.add_argument("--n", type=int, default=100, help="training conversations (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="conversation-sample seed (default 0)")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.split == "test":
        raise SystemExit("action_probe is a diagnosis: run it on dev, never on the sealed test sample")
    env = make("ambigsql")
    train = sample_conversations(env.tasks("train"), a.n, a.seed, env=env.name, split="train").tasks
    evals = task_order(env.tasks(a.split), 0, a.limit)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).eval()
    if a.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, a.adapter.split("=", 1)[1]).eval()
    n_layers = model.config.num_hidden_layers
    layers = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers})
    t0 = time.time()
    h_train, h_eval = hidden_states(model, tok, env, train, layers), hidden_states(model, tok, env, evals, layers)
    y_train = np.array([t.gold_action == CLARIFY for t in train])
    gold = [t.gold_action for t in evals]

    def report(pred: list[bool]) -> dict:
        asked = np.array(pred)
        g = np.array([x == CLARIFY for x in gold])
        return {"macro_f1": macro_f1(gold, ["CLARIFY" if p else "ANSWER" for p in pred]),
                "ask_clarify": float(asked[g].mean()), "ask_answer": float(asked[~g].mean()),
                "J": float(asked[g].mean() - asked[~g].mean())}

    res: dict = {"model": a.model, "adapter": a.adapter, "n": a.n, "seed": a.seed, "split": a.split,
                 "eval_tasks": len(evals), "layers": {}}
    for j, layer in enumerate(layers):
        x_tr = np.stack([h[j] for h in h_train])
        x_ev = np.stack([h[j] for h in h_eval])
        sc = StandardScaler().fit(x_tr)
        clf = LogisticRegression(C=0.05, class_weight="balanced", max_iter=5000).fit(sc.transform(x_tr), y_train)
        res["layers"][layer] = report(list(clf.predict(sc.transform(x_ev))))
    text = TextActionClassifier().fit(train)
    res["text_classifier"] = report([p == CLARIFY for p in text.predict(evals)])
    res["wall_s"] = round(time.time() - t0, 1)
    print(f"probe of {a.model}{' + ' + a.adapter if a.adapter else ''}: n={a.n} seed={a.seed}, {len(evals)} {a.split} tasks")
    print(f"{'reader':<18} {'Macro F1':>9} {'ask|CLARIFY':>12} {'ask|ANSWER':>11} {'J':>7}")
    rows = [(f"layer {k}", v) for k, v in res["layers"].items()] + [("text classifier", res["text_classifier"])]
    for name, r in rows:
        print(f"{name:<18} {100 * r['macro_f1']:>9.1f} {100 * r['ask_clarify']:>12.1f} {100 * r['ask_answer']:>11.1f} "
              f"{100 * r['J']:>7.1f}")
    print(f"wall {res['wall_s']} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
