"""The configuration reference: every key with its type, default and help, as the Markdown table the README
keeps between its markers (``medgen config --doc`` / ``--update README.md``; a test checks it is current)."""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from typing import Any, Literal

from medgen.config.schema import ASSETS, LIMITS, Config, limit_text


def iter_fields(cls: type = Config, prefix: str = ""):
    """Yield (dotted key, type, default, help) for every leaf field."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from iter_fields(hint, f"{prefix}{f.name}.")
        else:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            help_ = f.metadata.get("help", "")
            if any(f.metadata.get(k) is not None for k in LIMITS):  # the limits, as validation states them
                help_ += f" ({limit_text(f.metadata).replace('must be ', '')})"
            yield f"{prefix}{f.name}", hint, default, help_


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return " \\| ".join(map(str, args))  # escaped: a bare | would end the Markdown table cell
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None))
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if origin is dict:
        return "mapping"
    return getattr(hint, "__name__", str(hint))


def config_doc() -> str:
    """Markdown reference of every config key (kept in README.md; CI checks it is current)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, hint, default, help_ in iter_fields():
        if isinstance(default, str) and default.startswith(str(ASSETS)):
            default = "<bundled demo " + os.path.basename(default) + ">"
        shown = json.dumps(default) if not isinstance(default, str) else (f"`{default}`" if default else "`''`")
        if not isinstance(default, str):
            shown = f"`{shown}`"
        lines.append(f"| `{key}` | {_type_name(hint)} | {shown} | {help_} |")
    return "\n".join(lines) + "\n"


DOC_START, DOC_END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def update_doc(path: str) -> bool:
    """Rewrite the reference between the markers in ``path``; True when it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    head, _, rest = text.partition(DOC_START)
    _, _, tail = rest.partition(DOC_END)
    new = f"{head}{DOC_START}\n{config_doc()}{DOC_END}{tail}"
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
