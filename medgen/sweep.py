"""A sweep: a base config and a grid (dotted key -> values), every combination one run directory under the
sweep's run.dir, all reading the one dataset the sweep prepares once.

``points(cfg)`` expands and validates the grid (every problem of every point at once); ``write_manifest``
records the points in ``<sweep dir>/sweep.json``, which the launchers, ``medgen status`` and the comparison
report (medgen/compare.py) read back with ``read_manifest``.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medgen import atomic, config
from medgen.config import Config
from medgen.errors import ConfigError, UserError
from medgen.layout import RunLayout, SweepLayout

POINT_STAGES = ("train", "evaluate", "generate", "report")  # what each point runs; prepare runs once
FIXED = ("run.", "data.", "slurm.", "sweep.")  # shared by every point: the grid may not vary them
MAX_NAME = 120


@dataclass
class Point:
    index: int
    name: str  # its directory under the sweep dir, named after its settings
    settings: dict[str, Any]  # dotted key -> value, as the grid gave it
    cfg: Config

    @property
    def layout(self) -> RunLayout:
        return self.cfg.layout


def parse_grid(items: list[str]) -> dict[str, list]:
    """``--grid key=v1,v2`` arguments -> {key: [v1, v2]}; values are YAML (``[a,b]`` and ``{k: v}`` too)."""
    grid, problems = {}, []
    for item in items:
        key, sep, values = item.partition("=")
        try:
            parsed = yaml.safe_load(f"[{values}]") if sep else None
        except yaml.YAMLError:
            parsed = None
        if not key.strip() or not isinstance(parsed, list) or not parsed:
            problems.append(f"--grid {item!r}: expected section.key=value1,value2,...")
            continue
        grid[key.strip()] = parsed
    if problems:
        raise ConfigError(problems)
    return grid


def flat_grid(grid: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{lora: {r: [8, 16]}}`` and ``{lora.r: [8, 16]}`` alike -> ``{"lora.r": [8, 16]}``."""
    out: dict[str, Any] = {}
    for key, value in grid.items():
        if isinstance(value, dict):
            out.update(flat_grid(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_grid(grid: dict[str, Any]) -> list[str]:
    known = {key for key, *_ in config.iter_fields()}
    p = []
    for key, values in grid.items():
        if key not in known:
            p.append(f"sweep.grid.{key}: unknown key (a dotted config key such as lora.r)")
        elif key.startswith(FIXED):
            p.append(f"sweep.grid.{key}: the same for every point of a sweep (run.dir holds the points, the data is "
                     "prepared once); set it in the base config")
        elif not isinstance(values, list) or not values:
            p.append(f"sweep.grid.{key}: must be a non-empty list of values (got {values!r})")
        elif len({json.dumps(v, sort_keys=True, default=str) for v in values}) != len(values):
            p.append(f"sweep.grid.{key}: a value is listed twice ({values!r})")
    return p


def label(value: Any) -> str:
    """A value as it appears in a directory name: scalars as written, lists and mappings without brackets."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if not isinstance(value, str) and isinstance(value, (list, dict)):
        text = re.sub(r'["{}\[\] ]', "", text).replace(",", "+") or "none"
    return text


def point_name(settings: dict[str, Any]) -> str:
    """``lora.r=8,train.learning_rate=5e-4``: only characters that are safe in a path and an sbatch script;
    a long one is cut and made unique by a hash of the settings."""
    name = re.sub(r"[^A-Za-z0-9_.+@=,:~-]", "_", ",".join(f"{k}={label(v)}" for k, v in settings.items()))
    if len(name) > MAX_NAME:
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}"
    return name or "base"


def _set(raw: dict, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    for s in sections:
        raw = raw[s]
    raw[leaf] = copy.deepcopy(value)


def point_config(base: Config, settings: dict[str, Any], name: str) -> Config:
    """The base config with the point's settings, its own run.dir under the sweep's, the sweep's shards and
    no grid: the very config a standalone run of this point would use (run.dir and run.name aside)."""
    raw = base.to_dict()
    for key, value in settings.items():
        _set(raw, key, value)
    raw["run"]["dir"] = str(Path(base.run.dir) / name)
    raw["run"]["name"] = f"{base.run.name}-{name}"
    raw["data"]["shards"] = base.shards_url
    raw["sweep"]["grid"] = {}
    return config.from_raw(raw)


def points(base: Config) -> list[Point]:
    """Every combination of the grid, validated; ConfigError lists every problem of every point at once."""
    grid = flat_grid(base.sweep.grid)
    if not grid:
        raise ConfigError(["sweep.grid: empty: give --grid section.key=v1,v2 or a sweep: grid: section"])
    problems = _check_grid(grid)
    bad = {p.split(":")[0].removeprefix("sweep.grid.") for p in problems}
    grid = {k: v for k, v in grid.items() if k not in bad}  # the points' own problems are reported too
    out, names = [], {}
    for i, combo in enumerate(itertools.product(*grid.values())):
        settings = dict(zip(grid, combo))
        name = point_name(settings)
        if name in names:
            problems.append(f"sweep: points {names[name]} and {settings} get the same directory name {name}")
        names[name] = settings
        try:
            out.append(Point(i, name, settings, point_config(base, settings, name)))
        except ConfigError as e:
            problems += [f"point {name}: {p}" for p in e.problems]
    if problems:
        raise ConfigError(problems)
    return out


# --------------------------------------------------------------------------- the manifest


def write_manifest(base: Config, pts: list[Point]) -> dict[str, Any]:
    """sweep.json: the grid, the shards and every point (index, name, settings, run dir)."""
    info = {"grid": flat_grid(base.sweep.grid), "shards": base.shards_url, "name": base.run.name,
            "points": [{"index": p.index, "name": p.name, "settings": p.settings, "run_dir": p.cfg.run.dir}
                       for p in pts]}
    path = SweepLayout(Path(base.run.dir)).manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(info, indent=2, default=str))
    return info


def read_manifest(sweep_dir: str | Path) -> dict[str, Any]:
    path = SweepLayout(Path(sweep_dir)).manifest
    if not path.exists():
        raise UserError(f"{path} not found: {sweep_dir} is not a sweep directory (medgen sweep --config C --grid ...)")
    return json.loads(path.read_text(encoding="utf-8"))


def is_sweep(run_dir: str | Path) -> bool:
    return SweepLayout(Path(run_dir)).manifest.exists()
