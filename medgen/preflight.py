"""Fail fast: what a command's stages will read and write, checked in seconds before any of them loads a model,
a tokenizer or a worker pool: every source file or object, the shards' destination, the prepared dataset a
later stage reads, and the whole prompts file (parsed). Every problem found is reported at once.

A store that never answered is not an outage: an object store that cannot be reached at all here is one line
at once (naming AWS_ENDPOINT_URL), not data.retry_seconds of retries. Outages of a store that answered are
retried by the stages (medgen/data/retry.py). A requeued SLURM job, whose store did answer before, waits for
an outage as the stages do.
"""
from __future__ import annotations

import os
import posixpath
from typing import Any, Callable, Iterable

from medgen.config import Config
from medgen.errors import InputError, UserError

# one attempt with short timeouts: enough to tell "answers" from "not there"
PROBE_CLIENT = {"connect_timeout": 2, "read_timeout": 10, "retries": {"total_max_attempts": 1}}


def check(cfg: Config, stages: Iterable[str], stores: bool = True) -> None:
    """Raise InputError with every problem of the inputs and outputs of ``stages`` (run in this order).
    ``stores=False`` (a SLURM submission, whose jobs may reach other networks than the login node): the
    prompts file only."""
    stages = list(stages)
    problems: list[str] = []
    if stores and "prepare" in stages:
        problems += _sources(cfg) + _destination(cfg)
    elif stores and any(s in stages for s in ("train", "evaluate")):
        problems += _dataset(cfg)
    if "generate" in stages:
        problems += _prompts(cfg)
    problems += adapter_problems(cfg, stages) + tracker_problems(cfg)
    if problems:
        raise InputError(problems)


def tracker_problems(cfg: Config) -> list[str]:
    """A tracker asked for whose library is not installed (medgen/tracking.py imports it only then)."""
    import importlib.util

    return [f"tracking.to: {t} is not installed here: pip install 'medgen[tracking]' (or pip install {t})"
            for t in cfg.tracking.to if importlib.util.find_spec(t) is None]


def adapter_problems(cfg: Config, stages: Iterable[str]) -> list[str]:
    """evaluate and generate run on the adapter training left in run.dir: none there (a mistyped run.dir, a
    training that never finished) is an error unless the base model was asked for (model.base_only)."""
    stages = list(stages)
    needs = [s for s in ("evaluate", "generate") if s in stages]
    if not needs or "train" in stages or cfg.model.base_only or cfg.layout.finished("train"):
        return []
    return [f"{needs[0]}: no adapter in run.dir={cfg.run.dir} ({cfg.layout.marker('train')} not found): train "
            "first, fix run.dir, or set model.base_only=true to use the base model alone"]


def _probe_options(url: str, storage_options: dict) -> dict:
    if "://" not in url or url.startswith("file://"):
        return storage_options
    return {**storage_options, "config_kwargs": {**storage_options.get("config_kwargs", {}), **PROBE_CLIENT}}


def _reach(key: str, url: str, cfg: Config, what: Callable[[Any, str], Any], writing: bool = False) -> list[str]:
    """``what(fs, path)`` once against the store of ``url``; a problem line if it fails (not found is fine for a
    destination: ``what`` decides)."""
    from medgen.data.retry import is_transient, retrying
    from medgen.data.storage import mapped, url_to_fs

    try:
        fs, path = url_to_fs(key, url, _probe_options(url, cfg.data.storage_options))
        if _requeued():  # the store answered the run before this one: an outage, not a wrong address
            retrying(lambda: what(fs, path), key, url, cfg.data.retry_seconds)
        else:
            what(fs, path)
    except UserError as e:
        return [str(e)]
    except Exception as e:
        if is_transient(e):
            return [_never_answered(key, url, e, cfg.data.retry_seconds)]
        err = mapped(e, key, url, writing)
        if not isinstance(err, UserError):
            raise
        return [str(err)]
    return []


def _never_answered(key: str, url: str, e: Exception, retry_seconds: float) -> str:
    from medgen.data.storage import first_line, redact, redact_text

    return (f"{key}: {redact(url)}: the object store does not answer ({redact_text(first_line(e))}); check "
            f"AWS_ENDPOINT_URL and the network (data.retry_seconds={retry_seconds:g} rides out outages of a store "
            "that answered, not one that never did)")


def _requeued() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _sources(cfg: Config) -> list[str]:
    from medgen.data.storage import is_glob, is_local

    p: list[str] = []
    sources = [cfg.data.source] if isinstance(cfg.data.source, str) else cfg.data.source
    for url in sources:
        if is_local(url):
            continue  # load_config checked it
        if is_glob(url):
            p += _reach("data.source", url, cfg, lambda fs, path: _matches(fs, path, url))
        else:
            p += _reach("data.source", url, cfg, lambda fs, path: fs.info(path))
    return p


def _matches(fs, path: str, url: str) -> None:
    from medgen.data.storage import redact

    if not fs.glob(path):
        raise UserError(f"data.source {redact(url)}: no file matches this pattern")


def _destination(cfg: Config) -> list[str]:
    """The shards' destination answers (object store) or can be made (local); a missing bucket, missing
    credentials or a read-only directory is found here (the probe write comes when prepare starts)."""
    from medgen.data.storage import is_local, local_path

    url = cfg.shards_url
    if is_local(url):
        parent = local_path(url)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent.rstrip("/")) or "."
        if not os.access(parent or ".", os.W_OK):
            return [f"data.shards: {url}: cannot create it ({parent} is not writable)"]
        return []
    return _reach("data.shards", url, cfg, lambda fs, path: fs.info(path.split("/", 1)[0]), writing=True)


def _dataset(cfg: Config) -> list[str]:
    """A later stage run on its own reads a prepared dataset: its manifest is there."""
    from medgen.data.shards import MANIFEST
    from medgen.data.storage import redact

    def manifest(fs, path: str) -> None:
        if not fs.exists(posixpath.join(path, MANIFEST)):
            raise UserError(f"data.shards: no {MANIFEST} at {redact(cfg.shards_url)}; run `medgen prepare` first "
                            "(or point data.shards at a prepared dataset)")

    return _reach("data.shards", cfg.shards_url, cfg, manifest)


def _prompts(cfg: Config) -> list[str]:
    """The whole prompts file, parsed: a bad line is found before training, not after it."""
    from medgen.data import prompts

    if cfg.generate.prompts == prompts.STDIN:
        return []
    from medgen import openai_batch

    try:
        got = prompts.read_prompts(cfg.generate.prompts, _probe_options(cfg.generate.prompts, cfg.data.storage_options),
                                   retry_seconds=0)
        if cfg.generate.format != "openai-batch" and got and isinstance(got[0], openai_batch.Request):
            # medgen's own output has no error lines: a line OpenAI's format or medgen does not allow stops the run
            err = openai_batch.first_error(got, cfg.generate.prompts)
            if err:
                return [err]
    except UserError as e:
        return [str(e)]
    except Exception as e:
        from medgen.data.retry import is_transient

        if not is_transient(e):
            raise
        return [_never_answered("generate.prompts", cfg.generate.prompts, e, cfg.data.retry_seconds)]
    return []
