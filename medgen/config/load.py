"""Loading a config: a YAML file, then ``section.key=value`` overrides, coerced to the schema's types
(medgen/config/schema.py) and checked: every problem of the file, the overrides, the field limits and what
only a stage knows (asked of the stage's own module) is reported at once, as one ConfigError.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from typing import Any, Literal, Optional

import yaml

from medgen.config.schema import Config
from medgen.errors import ConfigError


def load_config(path: Optional[str] = None, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """YAML file (optional) + ``a.b=value`` overrides -> validated Config, or ConfigError with every problem."""
    problems: list[str] = []
    raw: dict[str, Any] = {}
    if path:
        raw = _read_yaml(path)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r}: expected section.key=value")
            continue
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(f"override {item!r}: {p} is not a section")
                break
        else:
            node[parts[-1]] = _parse_scalar(value)
    return from_raw(raw, problems)


def from_raw(raw: dict[str, Any], problems: list[str] | None = None) -> Config:
    """A validated Config from a parsed mapping (as a YAML file holds it), or ConfigError with every problem
    (``problems``: those found before, reported with these)."""
    problems = list(problems or [])
    cfg = build_dataclass(Config, raw, "", problems)
    problems += cfg.problems()  # fields that failed to parse kept their (valid) defaults
    problems += stage_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _read_yaml(path: str) -> dict[str, Any]:
    """The file's mapping ({} when empty); bytes go to PyYAML, which reads UTF-8/16 and rejects the rest."""
    try:
        with open(path, "rb") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError([f"--config {path}: file not found"]) from None
    except OSError as e:
        raise ConfigError([f"--config {path}: cannot read it ({e.strerror or type(e).__name__})"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"--config {path}: not valid YAML ({str(e).splitlines()[0]})"]) from None
    except RecursionError:
        raise ConfigError([f"--config {path}: nested too deeply to be a config"]) from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise ConfigError([f"--config {path}: not valid YAML ({str(e).splitlines()[0][:100]})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"--config {path}: top level must be a mapping of sections (got {type(raw).__name__})"])
    return raw


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlong = 2, 4, 4, 40
_SHORT.maxstring = _SHORT.maxother = 80


def _shown(value: Any) -> str:
    """A bounded, one-line repr: a value from YAML may be huge, or aliased a billion times over."""
    return _SHORT.repr(value)[:200]


def _key(key: Any) -> str:
    return key if isinstance(key, str) and key.isprintable() and key else _shown(key)


def _parse_scalar(text: str) -> Any:
    if text.strip() == "-":  # YAML reads a lone dash as [None]; on the command line it means stdin
        return "-"
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):
        return text


def build_dataclass(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """An instance of the config dataclass ``cls`` from a parsed YAML mapping; each problem is appended to
    ``problems`` (prefixed), and a field that fails keeps its default. The profiles of launch/slurm use it too."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}? " if close else ""
            problems.append(f"{prefix}{_key(key)}: unknown key ({hint}known: {', '.join(sorted(names))})")
    obj = cls()
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            setattr(obj, f.name, build_dataclass(hint, raw[f.name], f"{prefix}{f.name}.", problems))
        else:
            value, err = _coerce(raw[f.name], hint)
            if err:
                problems.append(f"{prefix}{f.name}: {err} (got {_shown(raw[f.name])})")
            else:
                setattr(obj, f.name, value)
    return obj


def _coerce(value: Any, hint: Any) -> tuple[Any, Optional[str]]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return (value, None) if value in args else (None, f"must be one of {', '.join(map(str, args))}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None, None
        errors = []
        for inner in (a for a in args if a is not type(None)):
            coerced, err = _coerce(value, inner)
            if err is None:
                return coerced, None
            errors.append(err)
        return None, " or ".join(errors[:1] + [e.removeprefix("must be ") for e in errors[1:]])
    if origin is list:
        if not isinstance(value, list):
            return None, "must be a list"
        out = []
        for v in value:
            c, err = _coerce(v, args[0])
            if err:
                return None, f"list item {_shown(v)} {err}"
            out.append(c)
        return out, None
    if origin is dict:
        return (dict(value), None) if isinstance(value, dict) else (None, "must be a mapping")
    if hint is bool:
        return (value, None) if isinstance(value, bool) else (None, "must be true or false")
    if hint is int:
        if not isinstance(value, int) or isinstance(value, bool):
            return None, "must be an integer"
        return (value, None) if abs(value) < 2**63 else (None, "must fit in 64 bits")
    if hint is float:
        if isinstance(value, bool):
            return None, "must be a number"
        try:  # YAML 1.1 reads 5e-4 as a string
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            return None, "must be a number"
        return (number, None) if math.isfinite(number) else (None, "must be a finite number")
    if hint is str:
        return (value, None) if isinstance(value, str) else (None, "must be a string")
    return value, None


def stage_problems(cfg: Config) -> list[str]:
    """What only a stage's own module knows, asked of it: source files and globs, cleaning rules and language
    codes (the data layer), the SFTConfig keys train sets itself, the model's layers for lora.top_layers."""
    from medgen import models, train_args
    from medgen.data import clean, filters, prompts, read

    p = read.check_sources(cfg.data.source)
    p += clean.check_rules(cfg.data.clean_rules)
    p += filters.check_languages(cfg.data.languages)
    p += train_args.check(cfg.train.sft_args)
    p += train_args.check_scheduler(cfg.train.lr_scheduler)
    p += models.check_top_layers(cfg.model.name_or_path, cfg.lora.top_layers)
    p += prompts.check_exists(cfg.generate.prompts)
    return p


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, width=120)
