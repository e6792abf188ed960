"""`simkit model init-tiny`: a tiny randomly initialised Llama with an offline-trained tokenizer.

No model hub here or in CI, so tests and the demo make their own model: a byte-level BPE
tokenizer trained with `tokenizers` on a built-in corpus (prompt templates + English + SQL
vocabulary), a Zephyr-style chat template, and a 2-layer Llama. The result loads with
`AutoModelForCausalLM.from_pretrained(DIR)` / `AutoTokenizer.from_pretrained(DIR)` like any
real checkpoint, so every loading path in simkit is the real one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from simkit.config import add_config_args, config_or_exit

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

_WORDS = """the a an of to in and or is are was were be been what which who whom whose when where why how
do does did you your i me my we our they their it its this that these those there here please could would
should can will may might mean asking ask question clarify clarifying answer answers direct directly
ambiguous which one do you mean did you mean are you asking about the year total revenue profit million
billion thousand percent change difference average sum count number numbers list show find give name names
table tables column columns row rows order ordered by ascending descending top most least highest lowest
more less than greater equal between each every all any some no yes not only also both either neither
story passage context conversation user assistant system tall height age price city country singer song
concert stadium student course teacher department employee company year years month day date time
select from where group having limit distinct join on as inner left count avg min max sum like and or not
null is in exists union intersect except case when then else end asc desc"""


def _corpus(extra: list[str] | None = None) -> list[str]:
    from simkit.prompts import prompts_dir

    lines = [_WORDS] + list(extra or [])
    for p in sorted(prompts_dir().rglob("*.txt")):
        lines.extend(p.read_text(encoding="utf-8").splitlines())
    lines += [" ".join(str(i) for i in range(k, k + 50)) for k in range(0, 2000, 50)]
    lines += ["SELECT name FROM singer WHERE age > 30 ORDER BY age DESC LIMIT 3",
              "SELECT count(*) FROM concert GROUP BY year HAVING count(*) > 1",
              "Which one do you mean? Do you mean the total or the average?"] * 20
    return lines


def init_tiny(out: str | Path, seed: int = 0, vocab_size: int = 1024, hidden_size: int = 64,
              layers: int = 2, heads: int = 4, max_positions: int = 8192, corpus: str | Path | None = None) -> Path:
    """Write a tiny Llama + tokenizer to `out` and return the path. `corpus`: a text file whose
    lines are added to the tokenizer's training text (e.g. the task's prompts)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    extra = Path(corpus).read_text(encoding="utf-8").splitlines() if corpus else None
    tok.train_from_iterator(_corpus(extra), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE, model_max_length=max_positions,
    )
    hf_tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(hf_tok), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions, bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.save_pretrained(out)
    (out / "simkit_tiny.json").write_text(json.dumps({"seed": seed, "params": model.num_parameters()}))
    return out


class InitTinyConfig(BaseModel):
    """`simkit model init-tiny`'s settings; flags generated from these fields."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(json_schema_extra={"metavar": "DIR"}, description="output directory")
    seed: int = Field(0, description="weight-init seed (default 0)")
    vocab_size: int = Field(1024, json_schema_extra={"metavar": "N"}, description="BPE vocabulary size (default 1024)")
    hidden_size: int = Field(64, json_schema_extra={"metavar": "N"}, description="hidden size (default 64)")
    layers: int = Field(2, json_schema_extra={"metavar": "N"}, description="transformer layers (default 2)")
    corpus: Path | None = Field(None, json_schema_extra={"metavar": "FILE"},
                                description="text file whose lines also train the tokenizer (e.g. task prompts; "
                                            "default: none)")


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("model", help="model utilities (fetch, init-tiny)",
                       description="Model utilities. `fetch` writes a real model (default: SmolLM2-135M-Instruct) as "
                                   "a checkpoint folder; `init-tiny` writes a tiny random Llama for fast tests.")
    msub = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    t = msub.add_parser("init-tiny", help="write a tiny random Llama + offline BPE tokenizer + chat template",
                        description="Write a tiny randomly initialised Llama (2 layers, hidden 64) with a byte-level "
                                    "BPE tokenizer trained offline and a Zephyr-style chat template. Loadable with "
                                    "from_pretrained(DIR); serve it with `simkit model-server --model DIR`.")
    add_config_args(t, InitTinyConfig)
    t.set_defaults(func=_run)
    from simkit.modelserver.fetch import register as register_fetch

    register_fetch(msub)


def _run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(InitTinyConfig, args, "model init-tiny")
    path = init_tiny(cfg.out, seed=cfg.seed, vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     layers=cfg.layers, corpus=cfg.corpus)
    print(f"tiny model written to {path}")
    return 0
