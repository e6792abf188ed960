"""`simkit compare`: runs side by side with 95% CIs, pooled seeds and paired differences.

Why: point estimates on a few hundred tasks hide noise, and an asker that asks at the right *rate*
but on the wrong turns can look good on Macro F1. Every number here is recomputed from per-task
rows (`results.py`): a run dir's per_task.jsonl (or its episodes.jsonl for older runs) or a rows
file under bench/results/.

* Rows are grouped by label: `--group LABEL=path1,path2` or each input's `_meta.label`; several
  runs under one label are seeds of one configuration and are pooled (mean ± sd over seeds, CI
  from the pooled bootstrap over tasks; `stats.pooled_seeds`).
* All compared runs must cover the same task ids (else an error saying how many differ).
* Paired differences (`--vs BASELINE`, repeatable; default the first row) use the same resampled
  tasks for both sides; seeds are paired as `stats.pair_indices` says. Acc also gets the exact
  McNemar p (discordant pairs summed over seed pairs: exact for one pair, approximate for more).
* Run dirs holding only metrics.json (no per-task evidence) print the older point-estimate table.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from simkit.evaluation import stats
from simkit.evaluation.results import FILE, ids_sha, read_rows, run_rows
from simkit.types import CLARIFY


@dataclass
class Run:
    """One evaluated run: its header and rows keyed by task id."""

    source: str
    meta: dict[str, Any]
    rows: dict[str, dict[str, Any]]


@dataclass
class Group:
    """Runs of one configuration (seeds), pooled under one label."""

    label: str
    runs: list[Run] = field(default_factory=list)


def load_run(path: str | Path) -> Run:
    """A run dir (per_task.jsonl, else episodes.jsonl) or a rows .jsonl file."""
    p = Path(path)
    if p.is_dir():
        if not (p / FILE).exists() and not (p / "episodes.jsonl").exists():
            raise SystemExit(f"{p}: no {FILE} or episodes.jsonl (run `simkit eval ... --out {p}` first)")
        meta, rows = run_rows(p)
    elif p.is_file():
        meta, rows = read_rows(p)
    else:
        raise SystemExit(f"{p}: no such run directory or rows file")
    partial = sum(r.get("status") == "p_question_only" for r in rows)
    if partial:
        raise SystemExit(f"{p}: {partial} rows hold only p_question (no eval behind them); merge into an eval's rows")
    meta.setdefault("label", p.stem if p.is_file() else p.name)
    return Run(str(p), meta, {r["task_id"]: r for r in rows})


def build_groups(inputs: Sequence[str], specs: Sequence[str] = ()) -> list[Group]:
    """Groups in order of first appearance: `--group` specs first, then inputs by their label."""
    groups: dict[str, Group] = {}
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"--group {spec!r}: expected LABEL=path1,path2,...")
        label, _, paths = spec.rpartition("=")  # the label may hold "=" (n=100); paths do not
        g = groups.setdefault(label, Group(label))
        g.runs += [load_run(x) for x in paths.split(",") if x]
    for path in inputs:
        run = load_run(path)
        label = str(run.meta.get("label"))
        groups.setdefault(label, Group(label)).runs.append(run)
    if not groups:
        raise SystemExit("simkit compare: no runs given")
    return list(groups.values())


def common_ids(groups: Sequence[Group]) -> list[str]:
    """The task ids every run covers (the first run's order); an error if any run differs."""
    first = groups[0].runs[0]
    ids = list(first.rows)
    ref = set(ids)
    for g in groups:
        for r in g.runs:
            s = set(r.rows)
            if s != ref:
                raise SystemExit(
                    f"simkit compare: runs must cover the same task ids: {g.label} ({r.source}) has {len(s - ref)} "
                    f"task ids that {first.meta.get('label')} ({first.source}) lacks and lacks {len(ref - s)} of its "
                    f"{len(ref)}; evaluate both on one sample (--tasks-file)")
    return ids


# --------------------------------------------------------------------------- per-task arrays and metrics
def arrays(run: Run, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-task arrays in `ids` order. A missing first action counts as the other action for
    Acc/F1 (as `metrics.confusion`) and as not asking for the ask rates."""
    rows = [run.rows[i] for i in ids]
    num = lambda k: np.array([np.nan if r.get(k) is None else float(r[k]) for r in rows], float)  # noqa: E731
    gold = np.array([r["gold_action"] == CLARIFY for r in rows], bool)
    first = [r.get("first_action") for r in rows]
    return {"gold_c": gold, "asked": np.array([bool(r.get("asked", f == CLARIFY)) for r, f in zip(rows, first)], bool),
            "pred_c": np.array([(not g) if f is None else f == CLARIFY for f, g in zip(first, gold)], bool),
            "correct": np.array([f == r["gold_action"] for f, r in zip(first, rows)], float),
            "answer_exec": num("answer_exec"), "post_clarify_exec": num("post_clarify_exec"),
            "turn_score": num("turn_score"), "traj_score": num("traj_score")}


def _rate(a: dict[str, np.ndarray], which: str) -> stats.IndexStat:
    return stats.index_ask_rate(a["gold_c"], a["asked"], which)


Maker = Callable[[dict[str, np.ndarray]], stats.IndexStat]
METRICS: list[tuple[str, str, Maker]] = [
    ("accuracy", "Acc", lambda a: stats.index_mean(a["correct"])),
    ("macro_f1", "Macro F1", lambda a: stats.index_macro_f1(a["gold_c"], a["pred_c"])),
    ("ask_rate_gold_clarify", "ask rate \\| gold CLARIFY", lambda a: _rate(a, "clarify")),
    ("ask_rate_gold_answer", "ask rate \\| gold ANSWER", lambda a: _rate(a, "answer")),
    ("ask_rate_diff", "J = ask-rate difference", lambda a: _rate(a, "j")),
    ("answer_exec", "{metric} on gold-ANSWER turns (first reply)", lambda a: stats.index_mean(a["answer_exec"])),
    ("post_clarify_exec", "post-clarify {metric} (gold CLARIFY, asked)",
     lambda a: stats.index_mean(a["post_clarify_exec"])),
]
PAIRED = ["macro_f1", "ask_rate_diff", "accuracy", "answer_exec"]


def summarize_group(g: Group, ids: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """Every metric of a group (pooled over its seeds), the random asker at its ask rate."""
    arrs = [arrays(r, ids) for r in g.runs]
    out: dict[str, Any] = {"label": g.label, "n": len(ids), "seeds": len(g.runs), "sources": [r.source for r in g.runs],
                           "meta": [r.meta for r in g.runs], "metrics": {}}
    for key, _, make in METRICS:
        out["metrics"][key] = stats.pooled_seeds([make(a) for a in arrs], len(ids), n_boot, seed=seed)
    q = float(np.mean([a["asked"].mean() for a in arrs])) if ids else 0.0
    out["random_asker"] = stats.random_asker(arrs[0]["gold_c"], q, seed=seed)
    for key, name in (("turn_score", "turn_score"), ("traj_score", "trajectory_score")):
        out["metrics"][name] = stats.pooled_seeds([stats.index_mean(a[key]) for a in arrs], len(ids), n_boot, seed=seed)
    for name, mask in (("post_clarify_score", "gold_c"), ("post_clarify_score_asked", "asked")):
        pc = [stats.index_mean(np.where(a[mask], a["traj_score"], np.nan)) for a in arrs]
        out["metrics"][name] = stats.pooled_seeds(pc, len(ids), n_boot, seed=seed)
    return out


def paired_group(a: Group, b: Group, ids: Sequence[str], n_boot: int, seed: int) -> dict[str, Any]:
    """a - b for the PAIRED metrics, with CI and p; McNemar on accuracy."""
    pa, pb = [arrays(r, ids) for r in a.runs], [arrays(r, ids) for r in b.runs]
    pairs = stats.pair_indices(len(pa), len(pb))
    makers = {k: m for k, _, m in METRICS}
    out: dict[str, Any] = {"label": a.label, "vs": b.label, "seed_pairs": len(pairs)}
    for key in PAIRED:
        out[key] = stats.paired_bootstrap_pooled([(makers[key](pa[i]), makers[key](pb[j])) for i, j in pairs],
                                                 len(ids), n_boot, seed=seed).as_dict()
    bsum = sum(stats.mcnemar(pa[i]["correct"], pb[j]["correct"])["b"] for i, j in pairs)
    csum = sum(stats.mcnemar(pa[i]["correct"], pb[j]["correct"])["c"] for i, j in pairs)
    out["mcnemar"] = {"b": bsum, "c": csum, "p": stats.mcnemar_exact(bsum, csum)}
    return out


# --------------------------------------------------------------------------- rendering
def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _cell(m: dict[str, Any], seeds: int) -> str:
    if m.get("value") is None:
        return "—"
    sd = f" ± {100 * m['sd']:.1f}" if seeds > 1 and m.get("sd") is not None else ""
    ci = f" [{_pct(m.get('lo'))}, {_pct(m.get('hi'))}]" if m.get("lo") is not None else ""
    return f"{_pct(m['value'])}{sd}{ci}"


def _diff(d: dict[str, Any]) -> str:
    if d.get("diff") is None:
        return "—"
    sign = lambda x: f"{100 * x:+.1f}"  # noqa: E731
    ci = f" [{sign(d['lo'])}, {sign(d['hi'])}]" if d.get("lo") is not None else ""
    return f"{sign(d['diff'])}{ci} p={d['p']:.3g}"


def render(summaries: Sequence[dict[str, Any]], paired: Sequence[dict[str, Any]], metric: str) -> str:
    """The results table, then the paired-differences table (markdown, x100)."""
    head = ["run"] + [t.format(metric=metric) + " [95% CI]" for _, t, _ in METRICS] + \
        ["random-asker Macro F1 at same rate [95% range]", "n", "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        r = s["random_asker"]
        rnd = "—" if r["macro_f1"] is None else \
            f"{_pct(r['macro_f1'])} [{_pct(r['macro_f1_lo'])}, {_pct(r['macro_f1_hi'])}]"
        cells = [s["label"]] + [_cell(s["metrics"][k], s["seeds"]) for k, _, _ in METRICS] + [rnd, str(s["n"]),
                                                                                             str(s["seeds"])]
        lines.append("| " + " | ".join(cells) + " |")
    if paired:
        lines += ["", "Paired differences (row − vs; 95% CI from the paired bootstrap over tasks, two-sided p):", "",
                  f"| run | vs | Δ Macro F1 | Δ J | Δ Acc | McNemar p (Acc) | Δ {metric} on gold-ANSWER turns | "
                  "seed pairs |", "|---|---|---|---|---|---|---|---|"]
        for d in paired:
            lines.append(f"| {d['label']} | {d['vs']} | {_diff(d['macro_f1'])} | {_diff(d['ask_rate_diff'])} | "
                         f"{_diff(d['accuracy'])} | {d['mcnemar']['p']:.3g} (b={d['mcnemar']['b']}, "
                         f"c={d['mcnemar']['c']}) | {_diff(d['answer_exec'])} | {d['seed_pairs']} |")
    return "\n".join(lines)


def _legacy(dirs: Sequence[str], plot: Path | None) -> str:
    """Run dirs with only metrics.json: the point-estimate table (no per-task rows, no CIs)."""
    from simkit.evaluation.plots import plot_vs_n
    from simkit.evaluation.metrics import markdown_table

    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in dirs]
    metric = runs[0].get("metric", "score") if len({r.get("metric") for r in runs}) == 1 else "score"
    if plot is not None:
        plot_vs_n(runs, plot)
    return markdown_table([(r.get("label", str(d)), r) for r, d in zip(runs, dirs)], metric) + \
        "\n\n(no per-task rows in these runs: point estimates only, no CIs)"


def _plot_points(summaries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One vs-n point per group: seed means of the plotted metrics, n_train from the header."""
    keys = ("macro_f1", "turn_score", "trajectory_score", "post_clarify_score", "post_clarify_score_asked")
    return [{"label": s["label"], "n_train": next((m.get("n_train") for m in s["meta"] if m.get("n_train") is not None),
                                                  None), **{k: s["metrics"][k]["value"] for k in keys}}
            for s in summaries]


def compare(inputs: Sequence[str | Path], plot: Path | None = None, groups: Sequence[str] = (),
            vs: Sequence[str] = (), json_out: Path | None = None, n_boot: int = stats.N_BOOT, seed: int = 0) -> str:
    """The markdown of `simkit compare` (and, with json_out, every number as JSON)."""
    inputs = [str(x) for x in inputs]
    bare = [d for d in inputs if Path(d).is_dir() and not (Path(d) / FILE).exists()
            and not (Path(d) / "episodes.jsonl").exists() and (Path(d) / "metrics.json").exists()]
    if bare and len(bare) == len(inputs) and not groups:
        return _legacy(bare, plot)
    if bare:
        raise SystemExit(f"simkit compare: {bare[0]} has only metrics.json (no per-task rows); compare it alone")
    gs = build_groups(inputs, groups)
    ids = common_ids(gs)
    summaries = [summarize_group(g, ids, n_boot, seed) for g in gs]
    by_label = {g.label: g for g in gs}
    bases = list(vs) or [gs[0].label]
    unknown = [b for b in bases if b not in by_label]
    if unknown:
        raise SystemExit(f"--vs {unknown[0]!r}: no such row (rows: {', '.join(by_label)})")
    paired = [paired_group(g, by_label[b], ids, n_boot, seed) for b in bases for g in gs if g.label != b]
    metrics = {r.meta.get("metric") for g in gs for r in g.runs} - {None}
    metric = metrics.pop() if len(metrics) == 1 else "score"
    if plot is not None:
        from simkit.evaluation.plots import plot_vs_n

        plot_vs_n(_plot_points(summaries), plot)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"n_tasks": len(ids), "task_ids_sha256": ids_sha(ids), "n_boot": n_boot,
                                        "seed": seed, "metric": metric, "rows": summaries, "paired": paired},
                                       indent=1, default=str))
    return render(summaries, paired, metric)


class CompareConfig(BaseModel):
    """`simkit compare`: runs side by side, recomputed from per-task rows."""

    model_config = ConfigDict(extra="forbid")

    runs: list[str] = Field(default_factory=list, json_schema_extra={"positional": True, "metavar": "RUN"},
                            description="run directories written by `simkit eval` and/or per-task .jsonl files")
    group: list[str] = Field(default_factory=list, json_schema_extra={"repeatable": True,
                                                                       "metavar": "LABEL=path1,path2"},
                             description="pool these runs (seeds of one configuration) under LABEL (repeatable)")
    vs: list[str] = Field(default_factory=list, json_schema_extra={"repeatable": True, "metavar": "LABEL"},
                          description="paired differences of every other row against this row (repeatable; "
                                      "default: the first)")
    json_out: Path | None = Field(None, json_schema_extra={"flags": ["--json"], "metavar": "PATH"},
                                  description="write every number (per-seed values, CIs, p-values) as JSON here")
    n_boot: int = Field(stats.N_BOOT, ge=100, description="bootstrap resamples")
    seed: int = Field(0, description="bootstrap seed")
    plot: Path | None = Field(None, description="write a PNG of metrics vs number of training conversations")


def register_cli(sub: Any) -> None:
    from simkit.config import add_config_args

    c = sub.add_parser(
        "compare", help="runs side by side with 95%% CIs, pooled seeds and paired differences",
        description="Recompute every metric from per-task rows (run dirs' per_task.jsonl or episodes.jsonl, or "
                    "rows files from `simkit results export`) and print one markdown table (mean [95% bootstrap "
                    "CI]; pooled seeds: mean ± sd over seeds [pooled CI]) with Acc, Macro F1, ask rate | gold "
                    "CLARIFY, ask rate | gold ANSWER, their difference J, the content score of the first reply on "
                    "gold-ANSWER turns, post-clarify score, and the Macro F1 range of a random asker at the same "
                    "ask rate; then paired differences against --vs rows (CI, p, McNemar). All runs must cover "
                    "the same task ids.")
    add_config_args(c, CompareConfig, config_flag=False)
    c.set_defaults(func=_main)


def _main(args: Any) -> int:
    from simkit.config import config_or_exit

    cfg = config_or_exit(CompareConfig, args, "compare")
    print(compare(cfg.runs, cfg.plot, cfg.group, cfg.vs, cfg.json_out, cfg.n_boot, cfg.seed))
    return 0
