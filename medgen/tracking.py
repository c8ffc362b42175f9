"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases (``tracking.to``).

One tracker run per run directory, whatever runs its stages: its identity is kept in
``<run.dir>/tracking.json`` (``RunLayout.tracking``), so a resumed or requeued job, and every later stage,
reopens the same tracker run instead of opening a second one. Only rank 0 reports. What each stage reports:
the config (parameters), the training curves step by step (every number of a ``train_log.jsonl`` line, under
its key there, validation included), evaluate's metrics with their intervals, and the stages' outputs as
artifacts (each stage's resolved config, metrics.json, the generations, the report).

A resumed training repeats the steps between its checkpoint and the kill: a step a tracker already holds is not
logged again (MLflow: its metric history is asked; W&B: the last step of each key is kept in tracking.json),
so the tracker's curves stay one point per step. Resuming is exact (tests/test_train.py), so the repeated
steps' losses are the ones the tracker holds.

Offline by design: MLflow writes to a SQLite store beside the run directory unless given a tracking URI
(``tracking.mlflow_uri`` or ``$MLFLOW_TRACKING_URI``), W&B runs in offline mode into ``<run.dir>/wandb``
(``wandb sync`` uploads it later). Neither library is imported unless asked for. Credentials come from the
environment only (the libraries read their own variables; medgen/logs.py redacts them from every log line);
a tracking URI's user:password part is never written to tracking.json or a log.

Failures: a tracker run that cannot be opened stops the stage before its work, in one line (the user asked
for it); a failure while logging is one warning per tracker and the stage goes on: train_log.jsonl and
metrics.json remain the record.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any, Iterator

from medgen import atomic
from medgen.config import Config
from medgen.errors import UserError
from medgen.layout import RECORD, SweepLayout

log = logging.getLogger("medgen")

TRACKERS = ("mlflow", "wandb")
MAX_PARAM = 6000  # MLflow's limit on a parameter's value (characters)

_current: "Session | None" = None


# --------------------------------------------------------------------------- what the stages call


@contextlib.contextmanager
def stage(cfg: Config, name: str) -> Iterator["Session | None"]:
    """The tracker run of ``cfg.run.dir`` opened for stage ``name`` on rank 0 (None elsewhere, or when no
    tracker is configured); the stage's outputs are reported when it ends, and its status set."""
    global _current
    if not cfg.tracking.to or not _rank_zero():
        yield None
        return
    session = Session(cfg, name)
    _current = session
    status = "FAILED"
    try:
        yield session
        session.stage_outputs()
        status = "FINISHED"
    except BaseException as e:
        from medgen.errors import Preempted

        status = "KILLED" if isinstance(e, (Preempted, KeyboardInterrupt, SystemExit)) else "FAILED"
        raise
    finally:
        _current = None
        session.close(status)


def log_step(record: dict[str, Any]) -> None:
    """One line of train_log.jsonl (rank 0 writes it): its numbers, at its step, to the open trackers."""
    if _current is not None:
        _current.step_metrics(record)


def _rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# --------------------------------------------------------------------------- the session of one stage


class Session:
    """The trackers of one run directory for one stage."""

    def __init__(self, cfg: Config, stage_name: str):
        self.cfg, self.stage = cfg, stage_name
        self.layout = cfg.layout
        self.record = _read_record(self.layout.tracking)
        self.point = _sweep_point(cfg)
        params = {**flat(cfg.to_dict()), **{f"sweep.{k}": v for k, v in (self.point or {}).get("settings", {}).items()}}
        self.trackers: list[Any] = []
        for kind in cfg.tracking.to:
            tracker = (MLflowRun if kind == "mlflow" else WandbRun)(cfg, self.record.get(kind), self.point)
            self.record[kind] = tracker.identity()
            self.trackers.append(tracker)
        self._save_record()
        for t in self.trackers:
            self._guard(t, t.params, params)
        log.info("tracking: %s", ", ".join(t.describe() for t in self.trackers))

    def step_metrics(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        values = {k: float(v) for k, v in record.items() if k not in ("step", "time") and _is_number(v)}
        for t in self.trackers:
            # what the tracker held before this stage started (a resume repeats steps after its checkpoint);
            # within one start, a step may log a key twice (a validation line after the step's own)
            new = {k: v for k, v in values.items() if step > t.held_before(k)}
            if new and self._guard(t, t.metrics, new, step):
                t.logged(new, step)
                self.record[t.kind] = t.identity()
        if any(t.kind == "wandb" for t in self.trackers):
            self._save_record()  # W&B's last step per key (MLflow's is asked of MLflow on reopening)

    def stage_outputs(self) -> None:
        """What the stage left, reported once it finished: metrics and artifacts."""
        lay, art = self.layout, self.cfg.tracking.artifacts
        files: list[tuple[Path, str]] = []
        metrics: dict[str, float] = {}
        if self.stage in ("train", "evaluate", "generate", "report") and lay.record(self.stage).exists():
            files.append((lay.record(self.stage), f"config/{self.stage}"))
        if self.stage == "evaluate" and lay.metrics.exists():
            metrics = evaluation_metrics(json.loads(lay.metrics.read_text(encoding="utf-8")))
            files.append((lay.metrics, "eval"))
        elif self.stage == "generate":
            files += [(p, "generations") for p in (lay.generations_file, lay.base_generations_file) if p.exists()]
        elif self.stage in ("report", "compare") and lay.report.is_dir():  # a sweep's comparison: its report/
            files += [(p, "report") for p in sorted(lay.report.iterdir()) if p.is_file() and p.name != RECORD]
        for t in self.trackers:
            if metrics:
                self._guard(t, t.summary, metrics)
            for path, folder in files if art else []:
                self._guard(t, t.artifact, path, folder)

    def close(self, status: str) -> None:
        for t in self.trackers:
            self._guard(t, t.close, status)

    def _save_record(self) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.layout.tracking, json.dumps(self.record, indent=2, sort_keys=True))

    def _guard(self, tracker, fn, *args) -> bool:
        """A tracker's failure while the stage runs is one warning and the tracker is left alone for the rest
        of the stage (a server gone would otherwise cost its client's retries at every step), not the stage's
        end."""
        if tracker.broken:
            return False
        try:
            fn(*args)
            return True
        except Exception as e:  # a server gone, a full disk, a library's own error: the stage's work goes on
            tracker.broken = True
            log.warning("tracking: %s failed (%s: %s); this stage goes on without it (train_log.jsonl and "
                        "metrics.json stay complete)", tracker.kind, type(e).__name__, str(e).splitlines()[0][:300])
            return False


# --------------------------------------------------------------------------- MLflow


def mlflow_uri(cfg: Config) -> str:
    """tracking.mlflow_uri, else $MLFLOW_TRACKING_URI, else a SQLite store beside the run directory (a sweep's
    points: beside the sweep's directory, where its parent run is), so the runs of one folder share one store."""
    from medgen import sweep

    uri = cfg.tracking.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri
    folder = Path(cfg.run.dir).absolute().parent
    if sweep.is_sweep(folder):
        folder = folder.parent
    return f"sqlite:///{folder / 'mlflow.db'}"


def shown(uri: str) -> str:
    """A URI without its user:password part, for logs and tracking.json."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def _answers(uri: str, timeout: float = 10.0) -> None:
    """A tracking server's /health answered, in seconds: MLflow's own client retries a server that does not
    answer for minutes before it gives up."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout)
    except urllib.error.HTTPError:
        return  # it answered (a proxy or authentication in front of it may refuse /health)
    except OSError as e:
        raise ConnectionError(f"no answer from {shown(uri)}/health within {timeout:g} s ({e})") from None


def _mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a file:// store is the user's choice to make
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # beside the store, not in whatever directory the job started in
        location = Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # another job created it meanwhile
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class MLflowRun:
    kind = "mlflow"

    def __init__(self, cfg: Config, record: dict | None, point: dict | None):
        self.uri = mlflow_uri(cfg)
        self.broken = False
        try:
            _answers(self.uri)
            self.client = _mlflow_client(self.uri)
            if record and record.get("run_id") and record.get("tracking_uri") == shown(self.uri):
                self.run_id = record["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
                self.resumed = True
            else:
                exp = _experiment(self.client, cfg.tracking.experiment, self.uri)
                tags = {"medgen.run_dir": str(Path(cfg.run.dir).absolute()), "mlflow.runName": cfg.run.name}
                if point and point.get("mlflow_parent"):
                    tags["mlflow.parentRunId"] = point["mlflow_parent"]
                self.run_id = self.client.create_run(exp, run_name=cfg.run.name, tags=tags).info.run_id
                self.resumed = False
            self.existing = self.client.get_run(self.run_id).data.params
        except Exception as e:
            raise UserError(f"tracking: cannot open an MLflow run in {shown(self.uri)}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0][:300]}") from None
        self.before: dict[str, int] = {}

    def identity(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": shown(self.uri)}

    def describe(self) -> str:
        return f"MLflow run {self.run_id} in {shown(self.uri)}" + (" (continued)" if self.resumed else "")

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        # a parameter cannot change once logged: a resumed run keeps the first value (each stage's resolved
        # config is an artifact, config/<stage>)
        new = [Param(k, _param(v)) for k, v in values.items() if k not in self.existing]
        for i in range(0, len(new), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=new[i:i + 100])

    def held_before(self, key: str) -> int:
        """The last step of ``key`` the run held when this stage opened it (-1: none)."""
        if key not in self.before:
            history = self.client.get_metric_history(self.run_id, key) if self.resumed else []
            self.before[key] = max((m.step for m in history), default=-1)
        return self.before[key]

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def logged(self, values: dict[str, float], step: int) -> None:
        pass  # MLflow's own history says what it holds

    def summary(self, values: dict[str, float]) -> None:
        self.metrics(values, 0)

    def artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


# --------------------------------------------------------------------------- Weights & Biases


class WandbRun:
    kind = "wandb"

    def __init__(self, cfg: Config, record: dict | None, point: dict | None):
        t = cfg.tracking
        # the mode for the whole process, not only this run: W&B's own usage analytics read the process-wide
        # setting and, unless it says offline, post to W&B's server (a DNS query seen in tests/test_tracking.py);
        # run_stage puts the environment back after the stage
        os.environ["WANDB_MODE"] = t.wandb_mode
        import wandb

        self.broken = False
        # W&B offline cannot be asked what the run holds: the last step of each key is kept in tracking.json
        self.before: dict[str, int] = dict((record or {}).get("last_step", {}))
        self.steps = dict(self.before)
        run_id = (record or {}).get("id") or uuid.uuid4().hex[:12]
        self.resumed = bool(record and record.get("id"))
        # console off: medgen's own log lines are the job log; machine info off: it probes cloud metadata
        # services by name (a DNS query from a node without network, seen in tests/test_tracking.py)
        settings = wandb.Settings(console="off", disable_git=True, silent=True, x_disable_machine_info=True)
        try:
            self.run = wandb.init(project=t.experiment, entity=t.wandb_entity or None, id=run_id, resume="allow",
                                  name=cfg.run.name, group=(point or {}).get("sweep"), mode=t.wandb_mode,
                                  dir=str(Path(cfg.run.dir).absolute()), settings=settings, reinit="create_new")
        except Exception as e:
            raise UserError(f"tracking: cannot start a W&B run ({t.wandb_mode}) in {cfg.run.dir}/wandb: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        self.id, self.mode = run_id, t.wandb_mode

    def identity(self) -> dict[str, Any]:
        return {"id": self.id, "mode": self.mode, "last_step": self.steps}

    def describe(self) -> str:
        return (f"W&B run {self.id} ({self.mode}, {self.run.dir})" + (" (continued)" if self.resumed else "")
                + (": upload it later with `wandb sync`" if self.mode == "offline" else ""))

    def params(self, values: dict[str, Any]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def held_before(self, key: str) -> int:
        return self.before.get(key, -1)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def logged(self, values: dict[str, float], step: int) -> None:
        self.steps.update({k: step for k in values})

    def summary(self, values: dict[str, float]) -> None:
        self.run.summary.update(values)

    def artifact(self, path: Path, folder: str) -> None:
        import wandb

        name = f"{folder.replace('/', '-')}-{self.id}"
        art = wandb.Artifact(name, type=folder.split("/")[0])
        art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


# --------------------------------------------------------------------------- sweeps


def open_sweep(base: Config, grid: dict[str, list]) -> None:
    """A sweep's MLflow parent run (its points' runs are its children), created once by the launcher and
    kept in <sweep dir>/tracking.json; W&B groups the points' runs by the sweep's name instead."""
    if "mlflow" not in base.tracking.to:
        return
    lay = SweepLayout(Path(base.run.dir))
    record = _read_record(lay.tracking)
    run = MLflowRun(base, record.get("mlflow"), None)
    if not run.resumed:
        run.params({f"grid.{k}": v for k, v in grid.items()})
        run.client.set_tag(run.run_id, "medgen.sweep", "parent")
    record["mlflow"] = run.identity()
    lay.root.mkdir(parents=True, exist_ok=True)
    atomic.write_text(lay.tracking, json.dumps(record, indent=2, sort_keys=True))
    log.info("tracking: sweep parent %s", run.describe())


def _sweep_point(cfg: Config) -> dict[str, Any] | None:
    """A sweep point's parent run, group and grid settings, read from the sweep directory above its run.dir."""
    from medgen import sweep

    parent = Path(cfg.run.dir).absolute().parent
    if not sweep.is_sweep(parent):
        return None
    manifest = sweep.read_manifest(parent)
    me = Path(cfg.run.dir).absolute()
    settings = next((p["settings"] for p in manifest["points"] if Path(p["run_dir"]).absolute() == me), None)
    if settings is None:
        return None
    parent_run = _read_record(SweepLayout(parent).tracking).get("mlflow", {})
    return {"sweep": manifest.get("name"), "settings": settings, "mlflow_parent": parent_run.get("run_id")}


# --------------------------------------------------------------------------- helpers


def evaluation_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """evaluate's metrics.json as tracker metrics: the numbers of base, tuned and delta (an interval as _lo and
    _hi), timing; not the per-tag breakdown (it is in the metrics.json artifact)."""
    out: dict[str, float] = {}
    for section in ("base", "tuned", "delta", "timing"):
        for k, v in (metrics.get(section) or {}).items():
            if _is_number(v):
                out[f"eval.{section}.{k}"] = float(v)
            elif isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v):
                out[f"eval.{section}.{k}_lo"], out[f"eval.{section}.{k}_hi"] = float(v[0]), float(v[1])
    return out


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _param(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text[:MAX_PARAM]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_record(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); remove it to start new tracker runs") from None
