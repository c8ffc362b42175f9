"""The shipped configs: valid, and leaving to the defaults what the defaults choose better for the machine.

A field whose default is picked at run time for the hardware (``opt(..., auto=...)`` in medgen/config/schema.py:
precision, generate.batch_size, eval.threads, data.workers) may be pinned in a shipped config only with a
comment on its line, or the line above, saying why: a user who starts from a config gets the fast defaults.
"""
import dataclasses
import re

import pytest
import yaml

from medgen import config
from medgen.config.schema import Config
from tests.helpers import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def auto_fields(cls=Config, prefix=""):
    """dotted key -> the value that means "chosen at run time", for every such field."""
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or isinstance(f.default_factory, type):
            out.update(auto_fields(f.default_factory, f"{prefix}{f.name}."))
        elif f.metadata.get("auto") is not None:
            out[f"{prefix}{f.name}"] = f.metadata["auto"]
    return out


def pinned(path):
    """(dotted key, value, the line and the one above it) of every leaf the YAML file sets."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found, stack = [], []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w.]*):(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        depth = len(m.group(1)) // 2
        stack = stack[:depth] + [m.group(2)]
        value = m.group(3).split(" #")[0].strip()
        if value:
            found.append((".".join(stack), yaml.safe_load(value), line + "\n" + (lines[i - 1] if i else "")))
    return found


def test_the_auto_fields_are_the_ones_documented():
    assert set(auto_fields()) == {"data.workers", "train.precision", "eval.threads", "generate.batch_size",
                                   "train.data_streams", "train.compile"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    config.load_config(str(path))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_pin_no_automatic_knob_without_saying_why(path):
    auto = auto_fields()
    bad = [f"{key}: {value!r}" for key, value, text in pinned(path)
           if key in auto and value != auto[key] and "#" not in text]
    assert not bad, f"{path.name} pins {bad} without a comment saying why: leave them to the automatic default"


def test_the_check_sees_a_pinned_knob(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  max_new_tokens: 8\n  batch_size: 8\ntrain:\n  precision: fp32  # exact\n")
    keys = {k: (v, "#" in t) for k, v, t in pinned(path)}
    assert keys == {"generate.max_new_tokens": (8, False), "generate.batch_size": (8, False),
                    "train.precision": ("fp32", True)}
