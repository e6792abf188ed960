"""One config system for every command: pydantic models, CLI flags generated from their fields,
YAML files, and one default per setting (the field's).

    add_config_args(parser, ServeConfig)          # one flag per field (nested models flattened)
    cfg = config_from_args(ServeConfig, args)     # field defaults < --config FILE.yaml < flags

A field's flag is `--field-name`; a field of a nested model gets `--outer-field-name`, unless the
field names its own flags with `json_schema_extra={"flags": ["--policy", ...]}` (the first one is
also the attribute name on the argparse namespace); `{"positional": True}` makes it a positional argument
and `{"repeatable": True}` a list flag given once per item (`--group A --group B`). Fields of types a flag cannot spell (dicts,
objects) and fields marked `{"cli": False}` get no flag: YAML only. Flag defaults are
SUPPRESSed, so a flag overrides the YAML only when it is given, and `--help` shows the field's
default. A YAML file may nest (`roles: {policy: {url: ...}}`) or use flag names at the top level
(`policy: http://...`, `timeout: 60`), which is what older files did.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def save_snapshot(cfg: BaseModel, run_dir: Path, name: str) -> Path:
    """The config a run used, as YAML in its run directory (loadable with --config)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(inner type, optional?) of `X | None`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _is_model(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


@dataclass(frozen=True)
class Leaf:
    """One setting: where it lives in the (nested) config and the flags that set it."""

    path: tuple[str, ...]
    field: FieldInfo
    flags: tuple[str, ...]

    @property
    def dest(self) -> str:
        return self.flags[0].lstrip("-").replace("-", "_")


def _extra(field: FieldInfo) -> dict[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def leaves(cls: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every setting of `cls` that has a flag, nested models flattened."""
    for name, field in cls.model_fields.items():
        ann, _ = _unwrap(field.annotation)
        extra = _extra(field)
        if extra.get("cli") is False:
            continue
        if _is_model(ann) and "flags" not in extra:
            yield from leaves(ann, prefix + (name,))
            continue
        if typing.get_origin(ann) is dict or ann is dict or ann is Any:
            continue
        flags = tuple(extra.get("flags") or ("--" + "-".join(prefix + (name,)).replace("_", "-"),))
        yield Leaf(prefix + (name,), field, flags)


def _help(field: FieldInfo) -> str:
    desc = field.description or ""
    if field.is_required():
        return desc + " (required)"
    if "default" in desc.lower():
        return desc
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):
        default = " ".join(map(str, default)) or "none"
    return desc + f" (default: {default})"


def add_config_args(parser: argparse.ArgumentParser, cls: type[BaseModel], *, config_flag: bool = True,
                    skip: tuple[str, ...] = ()) -> None:
    """One flag per setting of `cls`; nested models get an argument group each (their docstring's
    first line is its title). `skip`: dotted paths left to hand-written flags."""
    if config_flag:
        parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                            help="YAML file with any of these options (flags given here override it)")
    groups: dict[tuple[str, ...], Any] = {}
    all_leaves = sorted(leaves(cls), key=lambda lf: (len(lf.path) > 1, not lf.field.is_required()))
    for leaf in all_leaves:
        if ".".join(leaf.path) in skip:
            continue
        target: Any = parser
        if len(leaf.path) > 1:
            owner = leaf.path[:-1]
            if owner not in groups:
                groups[owner] = parser.add_argument_group(_group_title(cls, owner))
            target = groups[owner]
        _add_flag(target, leaf)


def _group_title(cls: type[BaseModel], owner: tuple[str, ...]) -> str:
    model: Any = cls
    for name in owner:
        model = _unwrap(model.model_fields[name].annotation)[0]
    doc = (model.__doc__ or "").strip().splitlines()
    return doc[0].rstrip(".") if doc else " ".join(owner)


def _add_flag(target: Any, leaf: Leaf) -> None:
    field = leaf.field
    ann, _ = _unwrap(field.annotation)
    extra = _extra(field)
    kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _help(field)}
    origin = typing.get_origin(ann)
    metavar = extra.get("metavar") or leaf.path[-1].upper().split("_")[-1]
    if ann is bool:
        kw["action"] = argparse.BooleanOptionalAction
    elif origin is list:
        (inner,) = typing.get_args(ann)
        many = {"action": "append"} if extra.get("repeatable") else {"nargs": "*" if extra.get("positional") else "+"}
        kw.update(type=_unwrap(inner)[0], metavar=metavar, **many)
    elif origin is Literal:
        choices = typing.get_args(ann)
        kw.update(choices=choices, type=type(choices[0]))
    elif ann in (int, float, str, Path):
        kw.update(type=ann, metavar=metavar)
    if extra.get("positional"):  # `simkit compare RUN...`: a field given by position
        if origin is not list and not field.is_required():
            kw["nargs"] = "?"
        target.add_argument(leaf.dest, **kw)
    else:
        target.add_argument(*leaf.flags, dest=leaf.dest, **kw)


def _put(values: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        inner = values.get(name)
        if not isinstance(inner, dict):
            inner = values[name] = {}
        values = inner
    values[path[-1]] = value


def values_from_yaml(cls: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """A YAML mapping as nested values: nested keys as they are, top-level flag names (the old
    flat spelling) moved to their place."""
    by_dest = {leaf.dest: leaf for leaf in leaves(cls)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in cls.model_fields:
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key].update(value)
            else:
                out[key] = value
        elif key in by_dest:
            _put(out, by_dest[key].path, value)
        else:
            out[key] = value  # unknown: the model rejects it (extra="forbid") or ignores it
    return out


def config_from_args(cls: type[BaseModel], args: argparse.Namespace, parser: argparse.ArgumentParser | None = None,
                     **fixed: Any):
    """The config: field defaults < `--config` YAML < flags given < `fixed`. A validation error
    names the flag (via `parser.error` when a parser is given)."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(values_from_yaml(cls, load_yaml(args.config)))
    given = vars(args)
    all_leaves = list(leaves(cls))
    for leaf in all_leaves:
        if leaf.dest in given and given[leaf.dest] is not None:
            _put(values, leaf.path, given[leaf.dest])
    values.update(fixed)
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        flags = {leaf.path: leaf.flags[0] for leaf in all_leaves}

        def where(loc: tuple) -> str:
            path = tuple(str(p) for p in loc)
            while path and path not in flags:
                path = path[:-1]
            return flags.get(path, ".".join(map(str, loc)) or "config")

        msg = "; ".join(f"{where(err['loc'])}: {err['msg']}" for err in e.errors())
        if parser is not None:
            parser.error(msg)
        raise ValueError(msg) from None


def config_or_exit(cls: type[BaseModel], args: argparse.Namespace, command: str):
    """`config_from_args`, or exit naming the command and the flag at fault: a bad flag is the
    user's to fix, not a traceback."""
    try:
        return config_from_args(cls, args)
    except ValueError as e:
        raise SystemExit(f"simkit {command}: {e}")


def dispatch(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse, run the chosen subcommand's `func`, map Ctrl-C to exit 130 (shared with `trainer`)."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
