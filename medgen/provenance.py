"""What each stage ran with: the resolved config, its fingerprint and what the stage decided at run time
(precision, processes, which model and adapter), written beside the stage's outputs
(``RunLayout.record(stage)``, atomically, together with them where the outputs are one directory).

The report and a sweep's comparison describe a run from these records, never from the config of the command
that renders them; ``disagreements`` says where two stages ran with settings that cannot be compared.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from medgen import atomic
from medgen.config import Config
from medgen.layout import RECORD, RunLayout


def record(cfg: Config, stage: str, **resolved: Any) -> dict[str, Any]:
    """The record of ``stage`` run with ``cfg``; ``resolved``: what the stage decided beyond the config."""
    import medgen

    return {"stage": stage, "fingerprint": cfg.fingerprint(), "medgen": medgen.__version__,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resolved": resolved,
            "config": cfg.to_dict()}


def write(cfg: Config, stage: str, folder: Path | None = None, **resolved: Any) -> Path:
    """Write the record into ``folder`` (default: where the layout keeps it; a stage that publishes a
    directory atomically passes its temporary folder, so the record lands with the outputs)."""
    path = (folder / RECORD) if folder is not None else cfg.layout.record(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, json.dumps(record(cfg, stage, **resolved), indent=2, default=str) + "\n")
    return path


def read(layout: RunLayout, stage: str) -> dict[str, Any] | None:
    """The stage's record, None if it never finished (or ran before records were written)."""
    path = layout.record(stage)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def config_of(rec: dict[str, Any] | None) -> Config | None:
    """The Config a record holds, as the stage resolved it (not re-validated: files it named may be gone)."""
    if not rec:
        return None
    from medgen.config import build_dataclass

    problems: list[str] = []
    return build_dataclass(Config, rec["config"], "", problems)


def disagreements(records: dict[str, dict | None]) -> list[str]:
    """Where stages of one run used settings that make their results describe different things: another base
    model or tokenizer, another adapter than the one training left."""
    out = []
    have = {k: v for k, v in records.items() if v}
    models = {k: v["config"]["model"]["name_or_path"] for k, v in have.items()}
    if len(set(models.values())) > 1:
        out.append("stages used different base models: " + ", ".join(f"{k} `{m}`" for k, m in models.items()))
    adapters = {k: v["resolved"].get("adapter_fingerprint") for k, v in have.items()
                if v["resolved"].get("adapter_fingerprint") is not None}
    trained = adapters.get("train")
    for k, a in adapters.items():
        if k != "train" and trained and a and a != trained:
            out.append(f"{k} used adapter {a}, but training left {trained}: rerun {k}")
    shards = {k: v["config"]["data"]["shards"] or str(Path(v["config"]["run"]["dir"]) / "data")
              for k, v in have.items() if k in ("train", "evaluate")}
    if len(set(shards.values())) > 1:
        out.append("train and evaluate read different datasets: " + ", ".join(f"{k} `{s}`" for k, s in shards.items()))
    return out
