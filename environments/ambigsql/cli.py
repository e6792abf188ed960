"""`simkit data build-ambigsql`: build the AmbigSQL conversations from Spider."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

EPILOG = """\
Sources (in --spider): spiderman_train_queries.csv -> split train, dev.json -> split test,
tables.json (schemas) and database/<db>/<db>.sqlite. Questions whose database is missing
are skipped and counted. Every usable question gives one unambiguous conversation (gold
action ANSWER); when a template applies, also one ambiguous conversation (gold action
CLARIFY) of type information (SELECT/WHERE), population (FROM) or presentation (ORDER BY/
GROUP BY/LIMIT), kept only if the gold SQL's result differs from an alternative reading's.
The output is one JSON file (stats, schemas, examples); the same inputs and --seed give the
same file. Load it with simkit.make("ambigsql", path=FILE). Without a file, the env builds
the same data on first use and caches it under $SIMKIT_CACHE_DIR (default ~/.cache/simkit).

example:
  simkit data build-ambigsql --spider $SIMKIT_DATA_DIR/spider --out runs/ambigsql.json
"""


class BuildAmbigSQLConfig(BaseModel):
    """`simkit data build-ambigsql`: every setting of one build (flags and `--config` YAML from it)."""

    model_config = ConfigDict(extra="forbid")

    spider: Path = Field(..., json_schema_extra={"metavar": "DIR"},
                         description="Spider folder with tables.json, dev.json, spiderman_train_queries.csv and "
                                     "database/")
    out: Path = Field(..., json_schema_extra={"metavar": "FILE"}, description="output JSON file (written atomically)")
    seed: int = Field(0, description="seed for template choice and alternatives")
    examples: int = Field(4, json_schema_extra={"metavar": "K"},
                          description="print K examples, one per ambiguity type first (default 4; 0: none)")
    splits: str = Field("train,test", description="comma-separated splits to build")
    limit: int | None = Field(None, json_schema_extra={"metavar": "N"},
                              description="use a seeded sample of N questions per split (quick runs; default: all)")
    rewrite_url: str | None = Field(
        None, json_schema_extra={"metavar": "URL"},
        description="optional: OpenAI-compatible base URL of an LLM that polishes the wording of ambiguous "
                    "questions (a rewrite is kept only if it still hides what the user must clarify; default: none)")
    rewrite_model: str | None = Field(None, description="model name for --rewrite-url (default: the server's first)")
    rewrite_concurrency: int = Field(16, json_schema_extra={"metavar": "N"}, description="parallel rewrite requests")


def _data_subparsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The `data` command's subcommands, shared with other modules that add data builders."""
    parser = sub.choices.get("data")
    if parser is None:
        parser = sub.add_parser("data", help="build task datasets",
                                description="Build task datasets from the raw sources in $SIMKIT_DATA_DIR.")
        parser.set_defaults(func=lambda args: (parser.print_help(), 0)[1])
    existing = getattr(parser, "_simkit_data_sub", None)
    if existing is None:
        existing = parser.add_subparsers(dest="data_command", metavar="DATASET")
        parser._simkit_data_sub = existing  # type: ignore[attr-defined]
    return existing


def register_cli(sub: argparse._SubParsersAction) -> None:
    from simkit.config import add_config_args

    data = _data_subparsers(sub)
    p = data.add_parser(
        "build-ambigsql", help="build AmbigSQL (ambiguous Spider text-to-SQL conversations)",
        description="Turn Spider questions into clarify-or-answer conversations for the ambigsql env: "
                    "ambiguous variants (with a reference clarifying question, the user's answer, the "
                    "disambiguated question and gold SQL) plus the unambiguous originals. Prints a stats "
                    "report (counts per split and ambiguity type, skipped questions) and a few examples.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, BuildAmbigSQLConfig)
    p.set_defaults(func=run_build)


def run_build(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from simkit.config import config_or_exit

    from . import build as builder

    cfg = config_or_exit(BuildAmbigSQLConfig, args, "data build-ambigsql")
    spider = cfg.spider
    missing = [n for n in ("tables.json", "dev.json", "spiderman_train_queries.csv", "database") if not (spider / n).exists()]
    if missing:
        print(f"error: {spider} lacks {', '.join(missing)}", file=sys.stderr)
        return 2
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    report = builder.build(spider, seed=cfg.seed, splits=splits, limit=cfg.limit)
    if cfg.rewrite_url:
        import asyncio

        from simkit.roles.client import RoleClient, RoleConfig

        async def polish() -> int:
            client = RoleClient("rewriter", RoleConfig(base_urls=[cfg.rewrite_url], model=cfg.rewrite_model))
            try:
                return await builder.rewrite_with_llm(report.examples, client, cfg.rewrite_model,
                                                      cfg.rewrite_concurrency)
            finally:
                await client.aclose()

        kept = asyncio.run(polish())
        report.stats["llm_rewritten"] = kept
        print(f"LLM rewriting kept {kept} rewritten questions")
    fp = builder.input_fingerprint(spider, cfg.seed, splits, cfg.limit)
    out = builder.save(report, cfg.out, fp)
    print(builder.format_stats(report.stats))
    if cfg.examples > 0:
        print()
        for e in builder.sample_examples([asdict(x) for x in report.examples], cfg.examples, cfg.seed):
            print(builder.format_example(e))
            print()
    print(f"wrote {len(report.examples)} conversations to {out}")
    return 0
